"""Agent prompts and chat formatting on a real bundled tokenizer."""

import pytest

from latent_relay.agents.prompts import agent_message, chat_ids


@pytest.fixture(scope="module")
def tokenizer():
    from latent_relay.agents.model_errors import ModelReferenceError
    from latent_relay.agents.models import resolve_model

    try:
        return resolve_model("smollm2-135m").tokenizer
    except ModelReferenceError as err:
        pytest.skip(str(err))


def test_first_agent_opens_a_conversation_later_agents_continue_it(tokenizer):
    first = tokenizer.decode(chat_ids(tokenizer, "PLAN IT"))
    later = tokenizer.decode(chat_ids(tokenizer, "JUDGE IT", continues=True))
    assert first.startswith("<|im_start|>system") and first.endswith("<|im_start|>assistant\n")
    assert "system" not in later and later.startswith("<|im_end|>") and "JUDGE IT" in later
    assert later.endswith("<|im_start|>assistant\n")
    # memory of the first agent + its (latent) assistant turn + the continuation = one well-formed conversation
    turns = [
        {"role": "user", "content": "PLAN IT"},
        {"role": "assistant", "content": "THOUGHTS"},
        {"role": "user", "content": "JUDGE IT"},
    ]
    whole = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert whole == first + "THOUGHTS" + later


def test_agent_message_carries_role_problem_texts_and_format():
    msg = agent_message("judger", "What is 2+2?", parent_texts=[("planner", "add")], answer_format="Box it.")
    assert msg.startswith("You are the Judger") and "What is 2+2?" in msg
    assert "[planner]:\nadd" in msg and msg.endswith("Box it.")
    assert agent_message("auditor", "q").startswith("You are the auditor agent")
    assert agent_message("x", "q", custom="Custom role.").startswith("Custom role.")
