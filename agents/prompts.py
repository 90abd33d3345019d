"""Role prompts and chat formatting for the agents of a graph (after LatentMAS, arXiv 2511.20639).

Every agent sees the task; latent agents additionally attend to the working memory they received, text agents
read their parents' texts as labelled sections. The final agent gets the task's answer-format instruction.
"""

from __future__ import annotations

from collections.abc import Sequence

ROLE_PROMPTS: dict[str, str] = {
    "planner": "You are the Planner. Lay out a short step-by-step plan to solve the problem. Do not solve it.",
    "critic": "You are the Critic. Check the plan so far for mistakes or missing steps and say how to fix them.",
    "refiner": "You are the Refiner. Combine the plan and the critique into a corrected, complete plan.",
    "judger": "You are the Judger. Using the reasoning so far, solve the problem carefully and give the final answer.",
    "math": "You are a Math expert. Solve the problem with careful mathematical reasoning.",
    "science": "You are a Science expert. Solve the problem with careful scientific reasoning.",
    "code": "You are a Code expert. Solve the problem, reasoning as a programmer would.",
    "summarizer": "You are the Summarizer. Weigh the experts' reasoning and give the single best final answer.",
    "solver": "Solve the problem carefully and give the final answer.",
    "reader": "You are the Reader. Read the document and the question, and find everything in the document that "
    "the question needs.",
    "answerer": "You are the Answerer. The Reader has read a document for you; using what it found, answer the "
    "question.",
}

GENERIC_ROLE = "You are the {name} agent. Work on the problem and help the team reach the right answer."


def role_instruction(role: str, custom: str | None = None) -> str:
    """The node's own prompt if given, else the built-in one for its role."""
    if custom:
        return custom
    return ROLE_PROMPTS.get(role, GENERIC_ROLE.format(name=role))


def agent_message(
    role: str,
    question: str,
    custom: str | None = None,
    parent_texts: Sequence[tuple[str, str]] = (),
    answer_format: str | None = None,
    has_memory: bool = False,
) -> str:
    """The user message of one agent: role, task, earlier agents' texts, and (final agent) the answer format."""
    parts = [role_instruction(role, custom), f"\nProblem:\n{question.strip()}"]
    if has_memory:
        parts.append("\nThe reasoning of the agents before you is in your working memory.")
    for sender, text in parent_texts:
        parts.append(f"\n[{sender}]:\n{text.strip()}")
    if answer_format:
        parts.append(f"\n{answer_format}")
    return "\n".join(parts)


_SENTINEL = "\u2063LATENT-RELAY-SLOT\u2063"


def chat_ids(tokenizer, message: str, continues: bool = False) -> list[int]:
    """Token ids of ``message`` as one user turn with the assistant's turn opened (the model's chat template).

    With ``continues`` the agent prefills on the memory of earlier agents, whose last turn is an assistant turn
    left open for their latent thoughts: the ids then close that turn and open a new user turn, so the whole
    memory reads as one well-formed conversation (system, user, assistant: thoughts, user, assistant: ...)
    instead of several conversations stacked on each other.
    """
    if not getattr(tokenizer, "chat_template", None):
        return list(tokenizer(message + "\n")["input_ids"])
    if not continues:
        return _template_ids(tokenizer, [{"role": "user", "content": message}])
    turns = [
        {"role": "user", "content": _SENTINEL},
        {"role": "assistant", "content": _SENTINEL},
        {"role": "user", "content": message},
    ]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    cut = text.rfind(_SENTINEL)
    if cut < 0:  # a template that drops assistant content: fall back to a fresh conversation
        return _template_ids(tokenizer, [{"role": "user", "content": message}])
    return list(tokenizer(text[cut + len(_SENTINEL) :], add_special_tokens=False)["input_ids"])


def _template_ids(tokenizer, turns) -> list[int]:
    ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)
