"""Prompt templates: the with-profile prompt and its counterfactual (profile removed).

Both prompts come from one template. What the counterfactual removes, exactly:

* ``input-only`` (the default): the profile block AND the task's instruction sentence that
  joins it to the input (``Task.suffix``, e.g. "Use the above abstracts as context ...");
  the prompt is the task input alone, as if the user had no history.
* ``keep-instruction``: only the profile items; the instruction sentence stays, so the two
  prompts differ in the items alone (the instruction then refers to an absent context).

For ``email`` and LaMP's ``news_headline`` the suffix is only punctuation, so both are the same.
The LongLaMP templates follow the benchmark's own prompt code (items joined with
", and "); see docs in ``shared/docs/benchmarks.md``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

Item = dict


@dataclass(frozen=True)
class Task:
    name: str
    fields: tuple[str, ...]            # profile item fields the template reads
    text_field: str | None             # the long field that is cut first when a prompt is too long
    render_item: Callable[[Item], str]
    suffix: str                        # between the profile block and the task input
    query: Callable[[str], str]        # retrieval query from the task input


def _after(marker: str) -> Callable[[str], str]:
    def q(text: str) -> str:
        i = text.find(marker)
        return text[i + len(marker):].strip() if i >= 0 else text
    return q


def _generic_item(item: Item) -> str:
    # Any string fields, in a stable order: "title: ...; text: ...".
    return "; ".join(f"{k}: {v}" for k, v in item.items() if isinstance(v, (str, int, float)) and k != "id")


TASKS: dict[str, Task] = {
    "abstract_generation": Task(
        "abstract_generation", ("title", "abstract"), "abstract",
        lambda it: f'"{it["abstract"]}" is the abstract for the title "{it["title"]}"',
        ". Use the above abstracts as context to understand the style and language of the user and, ",
        _after("items:")),
    "product_review": Task(
        "product_review", ("overall", "summary", "description", "reviewText"), "reviewText",
        lambda it: (f'"{it["overall"]}" is a rating for the product with description "{it["description"]}". '
                    f'"{it["summary"]}" is summary for "{it["reviewText"]}"'),
        ". Following the given patterns ", lambda s: s),
    # Published LongLaMP topic-writing items are {summary, content} (the Reddit post).
    "topic_writing": Task(
        "topic_writing", ("summary", "content"), "content",
        lambda it: f'"{it["summary"]}" is a summary for "{it["content"]}"',
        ". Following the given patterns, ", lambda s: s),
    "email": Task(
        "email", ("title", "text"), "text",
        lambda it: f'"{it["title"]}" is the title for "{it["text"]}"',
        ". ", _after(":")),
    "sotu": Task(
        "sotu", ("title", "text"), "text",
        lambda it: f'"{it["text"]}" is a paragraph from "{it["title"]}"',
        ". Following the same speaker's style and views, ", lambda s: s),
    # LaMP generation tasks 4, 5, 7 (after LaMP's own prompt code).
    "news_headline": Task(
        "news_headline", ("title", "text"), "text",
        lambda it: f'"{it["title"]}" is the title for "{it["text"]}"', ". ", _after(":")),
    "scholarly_title": Task(
        "scholarly_title", ("title", "abstract"), "abstract",
        lambda it: f'"{it["title"]}" is a title for "{it["abstract"]}"', ". Following the given patterns, ",
        _after(":")),
    "tweet_paraphrase": Task(
        "tweet_paraphrase", ("text",), "text",
        lambda it: f'"{it["text"]}"', " are written by the user. Following the given patterns, ", _after(":")),
    "generic": Task("generic", (), None, _generic_item,
                    "\n\nUsing what the above says about the user, ", lambda s: s),
}


def get_task(name: str) -> Task:
    from .errors import UserError
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def truncate_words(text: str, max_words: int | None) -> str:
    if max_words is None:
        return text
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words])


def profile_block(task: Task, items: list[Item], max_words: int | None = None) -> str:
    """Render items in retrieval order; ``max_words`` caps the profile's long-text words in total."""
    return ", and ".join(profile_parts(task, items, max_words))


def shown_items(task: Task, items: list[Item], max_words: int | None = None) -> list[Item]:
    """The items as they stand in the prompt, cut to ``max_words`` words of profile text.

    Items are filled greedily: the first items keep their text, the budget runs out on later
    ones, and an item left with no text is dropped (the profile is cut before the input). A task
    without a text field is cut as a whole rendered item (``profile_parts``), so its items come
    back uncut here."""
    out, budget = [], max_words
    for it in items:
        if budget is not None:
            if budget <= 0:
                break
            if task.text_field is not None:
                text = str(it[task.text_field])
                n = len(text.split())
                if n > budget:
                    it = {**it, task.text_field: truncate_words(text, budget)}
            else:
                n = len(task.render_item(it).split())
            budget -= min(n, budget)
        out.append(it)
    return out


def profile_parts(task: Task, items: list[Item], max_words: int | None = None) -> list[str]:
    """The rendered items exactly as they stand in the prompt (``profile_block`` joins them); see
    ``shown_items`` for how the budget is spent."""
    if max_words is not None and task.text_field is None:   # generic: cut the whole rendered item by words
        parts, budget = [], max_words
        for it in items:
            if budget <= 0:
                break
            r = task.render_item(it)
            parts.append(truncate_words(r, budget))
            budget -= min(len(r.split()), budget)
        return parts
    return [task.render_item(it) for it in shown_items(task, items, max_words)]


def profile_words(task: Task, items: list[Item]) -> int:
    """Words that ``profile_block``'s ``max_words`` budget counts for these items."""
    if task.text_field is not None:
        return sum(len(str(it[task.text_field]).split()) for it in items)
    return sum(len(task.render_item(it).split()) for it in items)


def personalized_prompt(task: Task, items: list[Item], user_input: str,
                        max_profile_words: int | None = None, max_input_words: int | None = None) -> str:
    block = profile_block(task, items, max_profile_words)
    x = truncate_words(user_input, max_input_words)
    if not block:
        return x
    return f"{block}{task.suffix}{x}"


COUNTERFACTUAL_PROMPTS = ("input-only", "keep-instruction")


def instruction(task: Task) -> str:
    """The task's instruction sentence without the punctuation that joins it to the profile block."""
    return task.suffix.lstrip(" .,;\n")


def counterfactual_prompt(task: Task, user_input: str, max_input_words: int | None = None,
                          keep_instruction: bool = False) -> str:
    """The causal intervention: the input (cut like the with-profile prompt's) without the profile
    block; with ``keep_instruction`` the task's instruction sentence is kept in front of it."""
    x = truncate_words(user_input, max_input_words)
    return f"{instruction(task)}{x}" if keep_instruction else x


_WS = re.compile(r"\s+")


def query_text(task: Task, user_input: str) -> str:
    return _WS.sub(" ", task.query(user_input)).strip()
