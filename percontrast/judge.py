"""An LLM judge of personalization, G-Eval style (the paper's third metric beside ROUGE-L and METEOR).

The judge reads the user's profile (the top-k items the generating prompt retrieved, with the
same k / retriever / seed), the task input, the user's own (reference) response and the
generated response, with a rubric: how well does the response match THIS user's style and
content, 1-5, NOT rewarding keywords merely copied from the profile. Its answer is not parsed:
as in G-Eval (Liu et al. 2023), the score is the expectation under the judge's next-token
distribution at the answer position, renormalized over the five digit tokens,

    score = sum_{s=1..5} s * p(s) / sum_{s=1..5} p(s),     mass = sum_{s=1..5} p(s)

``mass`` is reported beside the score: a judge that puts little probability on the digits is
not answering the question, and its score means little (``judge_score``).

Two back-ends, one interface (``digit_logprobs(messages) -> [{s: log p(s)}]``):

* ``LocalJudge``: any ``--model``-style spec ``models.load_model`` resolves; one forward per
  batch (left-padded), log-softmax over the full vocabulary at the last position. p(s) sums the
  token variants of the digit ("3" and " 3" where both are single tokens).
* ``ServerJudge``: an OpenAI-compatible server by base URL (``vllm serve``, ``python -m
  llama_cpp.server``): ``/chat/completions`` with ``logprobs=true, top_logprobs=20,
  max_tokens=1`` (or ``/completions`` with ``logprobs=20``). Only the top 20 tokens come back,
  so a digit outside them counts 0 and ``mass`` is a lower bound. Standard library only
  (urllib): bounded retries with backoff on connection errors, timeouts and 5xx; every failure
  is one ``UserError`` line.

The built-in models (``smollm2-135m``: 135M parameters; ``tiny-random``) are far too small to
judge anything: they exist so the plumbing can be tested offline. Every result made with them
carries ``NOT_A_JUDGE_NOTE``.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, Sequence

from .errors import UserError

SCORES = (1, 2, 3, 4, 5)
TOP_LOGPROBS = 20          # what vLLM allows by default (--max-logprobs 20) and OpenAI's maximum
ITEM_WORDS = 150           # each profile item's long text, cut for the judge's context
TEXT_WORDS = 400           # input, reference and response, each
JUDGE_APIS = ("chat", "completions")
SMALL_MODELS = ("smollm2-135m", "gemma3-270m", "tiny-random")
NOT_A_JUDGE_NOTE = ("the judge is a built-in test model ({name}: far too small to judge writing); its "
                    "scores only show that the judge plumbing runs and mean nothing about personalization")

SYSTEM = "You are a careful expert evaluator of personalized text generation."
RUBRIC = """You will be given a user's profile (texts this user wrote before), a task input, the reference \
response this user actually wrote for that input, and a generated response. Rate how well the generated \
response is personalized to this user.

Evaluation criterion:
Personalization (1-5): how well the generated response matches this user's writing style (tone, vocabulary, \
sentence length and structure) and the content this user would write (topics, opinions, level of detail), \
as the profile and the reference response show them. Do NOT reward keywords, names or phrases that are merely \
copied from the profile: copying the profile's words is not personalization unless they are used the way this \
user would use them for this task input. A response that ignores the task input scores low however many words \
it shares with the profile.

Evaluation steps:
1. Read the profile and the reference response; note this user's style and typical content.
2. Read the task input and the generated response.
3. Decide how closely the generated response matches this user's style and content for this input, \
disregarding words merely copied from the profile.
4. Assign a score from 1 (generic, or clearly another person's writing) to 5 (reads as if this user wrote it).

User profile:
{profile}

Task input:
{input}

Reference response (written by this user):
{reference}

Generated response:
{response}

Answer with a single digit from 1 to 5 and nothing else.
Personalization score (1-5):"""
# Part of every result's identity (compare's cell hash): editing the rubric re-judges.
PROMPT_VERSION = hashlib.sha256((SYSTEM + "\0" + RUBRIC).encode()).hexdigest()[:12]


# ---------------------------------------------------------------- the score (pure)

def judge_score(digit_logprobs: Mapping[int, float]) -> tuple[float | None, float]:
    """(score, mass) from the log-probs of the digit tokens 1..5 (natural log; a digit missing
    from the mapping, e.g. outside a server's top-20, has probability 0).

    score = sum_s s * p(s) / sum_s p(s), computed relative to the largest log-prob so that it
    stays defined however small the digits' total probability is; None when no digit has a
    finite log-prob. mass = sum_s p(s), the probability the judge put on answering with a digit."""
    lps = {s: float(lp) for s, lp in digit_logprobs.items() if s in SCORES and math.isfinite(float(lp))}
    if not lps:
        return None, 0.0
    top = max(lps.values())
    w = {s: math.exp(lp - top) for s, lp in lps.items()}   # p(s) / p(s_max), at least one is 1
    score = math.fsum(s * v for s, v in w.items()) / math.fsum(w.values())
    return score, math.fsum(math.exp(lp) for lp in lps.values())


def summarize(per: Sequence[dict]) -> dict:
    """Corpus values of per-example ``{"judge", "judge_mass"}``: the mean score over the examples
    that have one (None if none), the mean digit mass over all, and how many had no score."""
    scored = [p["judge"] for p in per if p["judge"] is not None]
    return {"judge": math.fsum(scored) / len(scored) if scored else None,
            "judge_mass": math.fsum(p["judge_mass"] for p in per) / len(per) if per else None,
            "judge_unscored": len(per) - len(scored)}


# ---------------------------------------------------------------- the prompt

def _cut(text: str, words: int) -> str:
    parts = str(text).split()
    return " ".join(parts) if len(parts) <= words else " ".join(parts[:words]) + " [...]"


def profile_for_judge(task, record: dict, prompt_opts) -> list[str]:
    """The profile items the generating prompt retrieved (same k, retriever, seed), rendered as the
    task's template renders them, each item's long text cut to ITEM_WORDS words. Before the
    generating prompt's own length cut: the judge sees the items, not a tokenizer's budget."""
    from .retrieval import retrieve_for

    items = retrieve_for(task, record, prompt_opts.k, prompt_opts.retriever, prompt_opts.seed)
    out = []
    for it in items:
        if task.text_field is not None and task.text_field in it:
            it = {**it, task.text_field: _cut(it[task.text_field], ITEM_WORDS)}
            out.append(task.render_item(it))
        else:
            out.append(_cut(task.render_item(it), ITEM_WORDS))
    return out


def judge_messages(profile: Sequence[str], user_input: str, reference: str, response: str) -> list[dict]:
    """The chat the judge answers: system + one user turn with the rubric and the four texts."""
    block = "\n".join(f"[{i}] {p}" for i, p in enumerate(profile, 1)) or "(no profile items)"
    user = RUBRIC.format(profile=block, input=_cut(user_input, TEXT_WORDS),
                         reference=_cut(reference, TEXT_WORDS) or "(empty)",
                         response=_cut(response, TEXT_WORDS) or "(empty)")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def flat_prompt(messages: list[dict]) -> str:
    """The chat as one plain text, for a tokenizer without a chat template or a /completions API.
    It ends with a space: the tokenizers of SmolLM2, Llama 3 and Qwen split digits from a leading
    space, so after "(1-5): " the digit itself is the next token."""
    return "\n\n".join(m["content"] for m in messages) + " "


# ---------------------------------------------------------------- back-ends

def _digit_variants(tok) -> dict[int, list[int]]:
    """Token ids that spell each digit at the start of an answer: "3" and " 3", where single tokens."""
    out = {}
    for s in SCORES:
        ids = set()
        for text in (str(s), " " + str(s)):
            enc = tok(text, add_special_tokens=False)["input_ids"]
            if len(enc) == 1:
                ids.add(enc[0])
        if not ids:
            raise UserError(f"judge tokenizer has no single token for the digit {s}; this model cannot be "
                            "scored by its digit log-probs")
        out[s] = sorted(ids)
    return out


class LocalJudge:
    """A Hugging Face causal LM read at the answer position: one forward per batch of prompts."""

    def __init__(self, spec: str, *, dtype: str = "auto", trust_remote_code: bool = False,
                 device: str | None = None, batch_size: int = 4):
        from .models import default_device, load_model

        self.spec, self.dtype, self.batch_size = spec, dtype, batch_size
        self.model, self.tok = load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code,
                                          device=device or default_device())
        self.model.eval()
        self.digits = _digit_variants(self.tok)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    def describe(self) -> dict:
        return local_description(self.spec, self.dtype)

    def check(self) -> None:
        """Nothing to reach: loading the model in __init__ was the check."""

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                enable_thinking=False)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(flat_prompt(messages), add_special_tokens=True)["input_ids"]

    def digit_logprobs(self, batch: Sequence[list[dict]], ids: Sequence[str] | None = None) -> list[dict[int, float]]:
        import torch

        prompts = [self.prompt_ids(m) for m in batch]
        for i, p in enumerate(prompts):
            if self.max_positions and len(p) > self.max_positions:
                where = f"record {ids[i]}" if ids else f"prompt #{i}"
                raise UserError(f"{where}: the judge prompt is {len(p)} tokens, longer than the judge model's "
                                f"context ({self.max_positions}); use a judge with a longer context or lower --k")
        out: list[dict[int, float]] = []
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for at in range(0, len(prompts), self.batch_size):
            chunk = prompts[at: at + self.batch_size]
            width = max(map(len, chunk))
            # Left padding puts every prompt's answer position last; positions restart at each
            # prompt's first real token, so a padded row computes what it would alone.
            ids_t = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=ids_t, attention_mask=mask, position_ids=pos).logits[:, -1]  # [B, V]
            # at least float32 for the softmax (bf16 logits lose the digits' small differences)
            lp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
            for row in lp:
                out.append({s: float(torch.logsumexp(row[v], dim=0)) for s, v in self.digits.items()})
        return out


class ServerJudge:
    """An OpenAI-compatible server: one request per prompt, ``concurrency`` at a time."""

    def __init__(self, base_url: str, *, model: str | None = None, api: str = "chat",
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 2,
                 concurrency: int = 4):
        self.base = normalize_base_url(base_url)
        self.model, self.api, self.api_key_env = model, api, api_key_env
        self.timeout, self.retries, self.concurrency = timeout, retries, concurrency

    def describe(self) -> dict:
        """What decides the scores (compare's cell hash): URL, served model, API and the rubric.
        Call ``resolve_model`` first when no model was named."""
        return {"backend": "server", "judge": self.base, "model": self.model, "api": self.api,
                "prompt_version": PROMPT_VERSION}

    # -- HTTP ---------------------------------------------------------------------
    def _request(self, path: str, body: dict | None = None) -> dict:
        url = self.base + path
        headers = {"Accept": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 4.0))   # 0.5, 1, 2, 4, 4 ... s
            try:
                with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers),
                                            timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:
                detail = " ".join(e.read(300).decode("utf-8", "replace").split())
                if e.code >= 500 or e.code == 429:   # the server's trouble, maybe passing: retry
                    last = f"HTTP {e.code} {detail}"
                    continue
                hint = f" (API key from ${self.api_key_env}{' is not set' if not key else ''})" \
                    if e.code in (401, 403) else ""
                raise UserError(f"judge server {url}: HTTP {e.code}{hint}: {detail[:200]}") from None
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                    http.client.HTTPException) as e:   # e.g. a port that does not speak HTTP
                reason = getattr(e, "reason", e)
                last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
                continue
            try:
                return json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise UserError(f"judge server {url}: the answer is not JSON ({raw[:80]!r}); is --judge the "
                                "server's OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)?") from None
        raise UserError(f"judge server {url}: unreachable after {self.retries + 1} tries ({last}); start it "
                        "(e.g. vllm serve MODEL --port 8000) or fix --judge")

    def resolve_model(self) -> str:
        """The served model: --judge-model, or the server's only model (GET /models)."""
        if self.model is None:
            res = self._request("/models")
            listed = res.get("data") if isinstance(res, dict) else None
            names = [m.get("id") for m in listed or [] if isinstance(m, dict) and m.get("id")]
            if len(names) != 1:
                raise UserError(f"judge server {self.base}: serves {len(names)} models "
                                f"({', '.join(map(str, names[:5])) or 'none listed'}); name one with --judge-model")
            self.model = str(names[0])
        return self.model

    def check(self) -> None:
        """Resolve the model and make one scoring request, so a server that is down or returns no
        log-probs fails before any generation."""
        self.resolve_model()
        self.digit_logprobs([judge_messages(["a note"], "Say hi.", "Hi!", "Hello!")])

    def _one(self, messages: list[dict]) -> dict[int, float]:
        if self.api == "chat":
            path = "/chat/completions"
            body = {"model": self.model, "messages": messages, "max_tokens": 1, "temperature": 0,
                    "logprobs": True, "top_logprobs": TOP_LOGPROBS}
        else:
            path = "/completions"
            body = {"model": self.model, "prompt": flat_prompt(messages), "max_tokens": 1, "temperature": 0,
                    "logprobs": TOP_LOGPROBS}
        res = self._request(path, body)
        try:
            top = _top_logprobs(res, self.api)
        except (KeyError, IndexError, TypeError, AttributeError):
            top = None
        if not top:
            raise UserError(f"judge server {self.base + path}: the response has no top log-probs "
                            f"(choices[0].logprobs is {_shown_logprobs(res)}); this server does not return "
                            "them (transformers serve ignores logprobs): use vllm serve or llama_cpp.server"
                            + (", or --judge-api completions" if self.api == "chat" else ""))
        return digit_logprobs_from_top(top)

    def digit_logprobs(self, batch: Sequence[list[dict]], ids: Sequence[str] | None = None) -> list[dict[int, float]]:
        if self.concurrency <= 1 or len(batch) <= 1:
            return [self._one(m) for m in batch]
        with ThreadPoolExecutor(self.concurrency) as pool:   # keeps order; the first error propagates
            return list(pool.map(self._one, batch))


def _top_logprobs(res: dict, api: str) -> list[tuple[str, float]]:
    """(token, log-prob) pairs of the first generated token, from either response shape."""
    lp = res["choices"][0]["logprobs"]
    if api == "chat":   # {"content": [{"token", "logprob", "top_logprobs": [{"token", "logprob"}]}]}
        first = lp["content"][0]
        return [(t["token"], t["logprob"]) for t in first.get("top_logprobs") or []]
    first = lp["top_logprobs"][0]   # completions: [{token: logprob, ...}] per generated token
    return list(first.items())


def _shown_logprobs(res) -> str:
    try:
        return json.dumps(res["choices"][0].get("logprobs"))[:60]
    except (KeyError, IndexError, TypeError, AttributeError):
        return "missing"


def digit_logprobs_from_top(top: Sequence[tuple[str, float]]) -> dict[int, float]:
    """log p(s) per digit from a server's top tokens: tokens that are the digit after stripping
    spaces ("3", " 3") are pooled (log-sum-exp); other tokens, "10" included, do not count."""
    acc: dict[int, list[float]] = {}
    for token, lp in top:
        t = str(token).strip()
        if len(t) == 1 and t in "12345" and lp is not None and math.isfinite(float(lp)):
            acc.setdefault(int(t), []).append(float(lp))
    out = {}
    for s, lps in acc.items():
        m = max(lps)
        out[s] = m + math.log(math.fsum(math.exp(v - m) for v in lps))
    return out


def normalize_base_url(url: str) -> str:
    """``http://host:port`` gets the OpenAI path ``/v1``; a URL with a path is used as given."""
    p = urllib.parse.urlsplit(url.strip())
    if p.scheme not in ("http", "https") or not p.hostname:
        raise UserError(f"judge: {url!r} is not an http(s) base URL with a host (e.g. http://127.0.0.1:8000/v1)")
    try:
        p.port
    except ValueError:
        raise UserError(f"judge: {url!r} has an invalid port") from None
    path = p.path.rstrip("/") or "/v1"
    return urllib.parse.urlunsplit((p.scheme, p.netloc, path, "", ""))


def local_description(spec: str, dtype: str) -> dict:
    """A local judge's identity without loading it (the weights behind a path are not covered,
    as for the generating model)."""
    return {"backend": "local", "judge": spec, "dtype": dtype, "prompt_version": PROMPT_VERSION}


def is_server(spec: str) -> bool:
    return spec.strip().lower().startswith(("http://", "https://"))


def note_for(spec: str, served_model: str | None = None) -> str | None:
    """The warning every result from a built-in test model carries: the spec names one, its cache
    folder, or a server serves SmolLM2-135M (the GGUF the real-server test serves)."""
    for name in SMALL_MODELS:
        if spec.strip() == name or any(name in str(x).lower() for x in (spec, served_model or "")):
            return NOT_A_JUDGE_NOTE.format(name=name)
    return None


# ---------------------------------------------------------------- judging records

def judge_records(judge, task, records: Sequence[dict], texts: Sequence[str], prompt_opts,
                  batch_size: int = 16) -> list[dict]:
    """Per example ``{"judge": score or None, "judge_mass": mass}`` in record order."""
    per = []
    for at in range(0, len(records), batch_size):
        recs, outs = records[at: at + batch_size], texts[at: at + batch_size]
        msgs = [judge_messages(profile_for_judge(task, r, prompt_opts), r["input"], r["output"], t)
                for r, t in zip(recs, outs)]
        for lps in judge.digit_logprobs(msgs, ids=[str(r["id"]) for r in recs]):
            score, mass = judge_score(lps)
            per.append({"judge": score, "judge_mass": mass})
    return per


def judge_into(judge, task, records: Sequence[dict], texts: Sequence[str], prompt_opts, per: list[dict],
               corpus: dict) -> dict:
    """Judge every example and add the scores to a command's results: ``judge`` / ``judge_mass`` into
    each ``per`` row (replacing any) and their means into ``corpus``. Returns the block a results
    file carries: the judge's description, ``unscored``, ``judge_s`` and ``note`` (None unless the
    judge is a built-in test model)."""
    t0 = time.perf_counter()
    scores = judge_records(judge, task, records, texts, prompt_opts)
    for p, j in zip(per, scores):
        p.update(j)
    totals = summarize(scores)
    corpus["judge"], corpus["judge_mass"] = totals["judge"], totals["judge_mass"]
    desc = judge.describe()
    return {**desc, "unscored": totals["judge_unscored"], "judge_s": round(time.perf_counter() - t0, 2),
            "note": note_for(desc["judge"], desc.get("model"))}
