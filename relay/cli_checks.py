"""The ``relay run`` / ``relay compare`` options checked before anything slow happens (no task data read, no model
loaded): each bad value is a :class:`UsageError` whose one-line message names the option."""

from __future__ import annotations

import math
import re

from latent_relay.relay.decode_config import DecodeConfig
from latent_relay.relay.graph import AgentGraph


class UsageError(ValueError):
    """The command line asks for something that cannot be done."""


#: Relay modes that hand over no working memory (``single`` is the one-agent baseline).
MEMORYLESS = ("single", "text")


def _bounds(model, field: str) -> tuple[int | None, int | None]:
    """The ``ge`` / ``le`` bounds a pydantic model declares for ``field`` (one source of truth for the limits)."""
    low = high = None
    for rule in model.model_fields[field].metadata:
        low = getattr(rule, "ge", low)
        high = getattr(rule, "le", high)
    return low, high


def _in_range(option: str, value: int, low: int | None, high: int | None = None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            raise UsageError(f"{option} must be at least {low}, got {value}")
        raise UsageError(f"{option} must be between {low} and {high}, got {value}")


def _positive(option: str, value: float, unit: str = "") -> None:
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{option} must be a positive number{unit}, got {value}")


def check_numbers(args) -> None:
    """Counts and sizes: ``--n``, ``--offset``, ``--latent-steps``, ``--max-new-tokens``, ``--batch-size``,
    ``--threads``, ``--soft-temperature``."""
    _in_range("--n", args.n, 1)
    _in_range("--offset", args.offset, 0)
    _in_range("--latent-steps", args.latent_steps, *_bounds(AgentGraph, "latent_steps"))
    _in_range("--max-new-tokens", args.max_new_tokens, *_bounds(DecodeConfig, "max_new_tokens"))
    _in_range("--batch-size", args.batch_size, 1)
    if args.threads is not None:
        _in_range("--threads", args.threads, 1)
    _positive("--soft-temperature", args.soft_temperature)


def check_combinations(args) -> None:
    """Options that only mean something together: ``--resume`` needs ``--out``; ``--timeout`` and ``--address``
    are the Ray runtime's."""
    if args.resume and not args.out:
        raise UsageError("--resume needs --out (the results file whose finished items it skips)")
    if args.no_retry_errors and not args.resume:
        raise UsageError("--no-retry-errors only applies with --resume")
    if args.runtime != "ray":
        for option, value in (("--timeout", args.timeout), ("--address", args.address)):
            if value is not None:
                raise UsageError(f"{option} applies to --runtime ray only")
    if args.timeout is not None:
        _positive("--timeout", args.timeout, " of seconds")


def check_device(device: str, *, here: bool) -> None:
    """``cpu``, ``cuda`` or ``cuda:N``; a CUDA device must exist on this machine when the models run ``here``
    (the local runtime, or Ray's private cluster; a cluster given by ``--address`` checks its own hosts)."""
    if device == "cpu":
        return
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise UsageError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if not here:
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA GPU is available on this machine; use --device cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def check_weights(args, modes: list[str]) -> None:
    """``--weights``: ``auto`` or a setting of :data:`latent_relay.agents.weights.SETTINGS` (``float64`` too, with
    text relay only: a relay that hands over working memory carries only the wire's float dtypes). ``--dtype``, its
    older name for float settings, becomes ``--weights`` here; the two may not disagree."""
    from latent_relay.agents.weights import SETTINGS
    from latent_relay.relay.wire.format import FLOAT_NAMES

    if args.dtype not in (None, "auto"):
        dtype = args.dtype.removeprefix("torch.")
        if dtype not in (*FLOAT_NAMES, "float64"):
            raise UsageError(f"--dtype {args.dtype!r}: use auto, {', '.join(FLOAT_NAMES)} (quantized: --weights)")
        if args.weights not in ("auto", dtype):
            raise UsageError(f"--dtype {args.dtype} and --weights {args.weights} disagree; give only --weights")
        option, args.weights = "--dtype", dtype
    else:
        option = "--weights"
    name = args.weights
    if name != "auto" and name not in (*SETTINGS, "float64"):
        raise UsageError(f"{option} {name!r}: use auto, {', '.join(SETTINGS)} (or float64 with text relay)")
    carried = SETTINGS[name][0] if name in SETTINGS else None  # the dtype of the working memory
    latent = [m for m in modes if m not in MEMORYLESS]
    if latent and name != "auto" and str(carried).removeprefix("torch.") not in FLOAT_NAMES:
        raise UsageError(
            f"{option} {name}: relay mode {latent[0]} hands over working memory, which travels as "
            f"{', '.join(FLOAT_NAMES)} only; use one of those (or --relay text)"
        )
    if SETTINGS.get(name, (None, None))[1] is not None and args.device != "cpu":
        raise UsageError(f"{option} {name}: quantized layers run on torch's CPU kernels; use --device cpu")


def check_run_args(args, modes: list[str]) -> None:
    """Every check above, for ``relay run`` / ``relay compare`` running ``modes``."""
    check_numbers(args)
    check_combinations(args)
    check_weights(args, modes)
    check_device(args.device, here=not (args.runtime == "ray" and args.address))
