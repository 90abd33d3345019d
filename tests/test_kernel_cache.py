"""kernels/native.py and kernels/cache_folder.py: a compiled kernel is loaded only from a cache folder that is this
user's alone, and only with the SHA-256 recorded when it was built."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import warnings

import pytest

from latent_relay.kernels import cache_folder, native

needs_native = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64")
    or not {"avx2", "fma", "f16c"} <= native._cpu_flags()
    or shutil.which(os.environ.get("CC", "cc")) is None,
    reason="the compiled CPU kernels need x86-64 with AVX2/FMA/F16C and a C compiler",
)

#: A library that would say so if it were ever loaded: its constructor runs at dlopen and creates the file RAN.
PLANT = """
#include <stdio.h>
__attribute__((constructor)) static void planted(void) { FILE *f = fopen(RAN, "w"); if (f) fclose(f); }
int evicted_gram(void) { return 0; }
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("RELAY_CACHE_DIR", str(root))
    native.load.cache_clear()
    yield root
    native.load.cache_clear()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build of the kernel for this module (compiling takes seconds): its folder, library and record."""
    root = tmp_path_factory.mktemp("built")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RELAY_CACHE_DIR", str(root))
        native.build("cpu_obf")
    return root / "kernels"


@pytest.fixture
def built_cache(cache, built):
    """A test's cache holding a copy of the module's build (modes kept), so `native.build` finds it built."""
    shutil.copytree(built, cache / "kernels")
    return cache


def _load_with_warnings():
    native.load.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native.load("cpu_obf")
    return lib, " ".join(str(w.message) for w in caught)


def _plant(target, ran, workdir):
    source = workdir / "plant.c"
    source.write_text(PLANT)
    cc = os.environ.get("CC", "cc")
    subprocess.run([cc, "-shared", "-fPIC", f'-DRAN="{ran}"', str(source), "-o", str(target)], check=True)


@needs_native
@pytest.mark.parametrize("record", ["kept", "deleted"])
def test_a_planted_library_with_the_right_name_is_never_loaded(built_cache, tmp_path, record):
    real = native.build("cpu_obf")
    ran = tmp_path / "planted-code-ran"
    _plant(real, ran, tmp_path)
    if record == "deleted":  # as a library built by an older latent-relay, or one put there by hand
        native.record_path(real).unlink()
    lib, warned = _load_with_warnings()
    assert not ran.exists()  # the planted library's code never ran in this process
    if record == "kept":
        assert lib is None and "does not match the SHA-256 recorded" in warned and "delete it" in warned
    else:  # rebuilt from the source before anything loaded it
        assert lib is not None and hasattr(lib, "top_directions")
        recorded = native.record_path(real).read_text().split()[0]
        assert hashlib.sha256(real.read_bytes()).hexdigest() == recorded


@pytest.mark.parametrize(("where", "mode"), [("root", 0o777), ("kernels", 0o775), ("kernels", 0o757)])
def test_a_cache_folder_others_can_write_is_refused(cache, monkeypatch, where, mode):
    monkeypatch.setattr(native, "_check_machine", lambda: None)  # the refusal comes first, on any machine
    folder = cache if where == "root" else cache / "kernels"
    (cache / "kernels").mkdir(parents=True)
    folder.chmod(mode)
    lib, warned = _load_with_warnings()
    assert lib is None and "is writable by" in warned and "chmod go-w" in warned and "using torch" in warned
    assert not list((cache / "kernels").glob("*.so"))  # nothing was built there either
    with pytest.raises(cache_folder.UntrustedCacheError, match=f"mode {mode:o}"):
        native.kernel_folder()


def test_a_cache_folder_another_user_owns_is_refused(cache, monkeypatch):
    monkeypatch.setattr(native, "_check_machine", lambda: None)
    (cache / "kernels").mkdir(parents=True, mode=0o700)
    monkeypatch.setattr(cache_folder, "trusted_owners", lambda: {os.geteuid() + 1})
    lib, warned = _load_with_warnings()
    assert lib is None and "belongs to another user" in warned


def test_cache_folders_are_created_owner_only_whatever_the_umask(tmp_path, monkeypatch):
    root = tmp_path / "deep" / "cache"
    monkeypatch.setenv("RELAY_CACHE_DIR", str(root))
    previous = os.umask(0o002)
    try:
        folder = native.kernel_folder()
    finally:
        os.umask(previous)
    assert folder == root / "kernels"
    assert stat.S_IMODE(root.stat().st_mode) == 0o700 and stat.S_IMODE(folder.stat().st_mode) == 0o700


@needs_native
def test_the_built_library_and_its_record_are_owner_only(cache):
    previous = os.umask(0o002)
    try:
        library = native.build("cpu_obf")
    finally:
        os.umask(previous)
    record = native.record_path(library)
    assert stat.S_IMODE(library.stat().st_mode) == 0o700 and stat.S_IMODE(record.stat().st_mode) == 0o600
    assert stat.S_IMODE(library.parent.stat().st_mode) == 0o700
    assert record.read_text() == f"{hashlib.sha256(library.read_bytes()).hexdigest()}  {library.name}\n"


@needs_native
@pytest.mark.parametrize("which", ["library", "record"])
def test_a_library_or_record_others_can_write_is_refused(built_cache, which):
    library = native.build("cpu_obf")
    (library if which == "library" else native.record_path(library)).chmod(0o666)
    lib, warned = _load_with_warnings()
    assert lib is None and "is writable by" in warned


@needs_native
def test_a_record_that_is_not_one_is_refused(built_cache):
    library = native.build("cpu_obf")
    native.record_path(library).write_text("not a record\n")
    lib, warned = _load_with_warnings()
    assert lib is None and "is not a SHA-256 record" in warned
