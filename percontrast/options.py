"""Option groups the commands' config dataclasses share, each declared once with its help text.

A command's config is a subclass of the groups it needs plus its own fields, e.g.
``TrainConfig(ModelDataOptions, LossOptions)``, so one flag, YAML key and Python keyword
has one declaration, one default and one validation rule everywhere. A group builds what
it describes: ``ModelOptions.load_model()``, ``PromptOptions.prompt_builder()``.

    ModelOptions      model, dtype, trust_remote_code
    PromptOptions     task, k, retriever, max_length, seed, counterfactual_prompt
    ModelDataOptions  the two above + data, limit (commands that read a data file)
    LossOptions       method, clip, normalize, refresh, on_nonfinite (train, and PerCETrainer itself)
    DecodingOptions   max_new_tokens, sampling, repetition penalty, batch size (generate, eval, compare)
    JudgeOptions      judge (a model spec or a server URL) and its connection settings (eval, compare)
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import field
from .errors import UserError
from .losses import METHODS
from .prompts import COUNTERFACTUAL_PROMPTS, TASKS

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")


def _parent_post_init(obj, cls) -> None:
    # Groups are combined by multiple inheritance: each validates its own fields, then passes on.
    parent = getattr(super(cls, obj), "__post_init__", None)
    if parent is not None:
        parent()


@dataclass
class ModelOptions:
    model: str = field("smollm2-135m", help="Model: a local checkpoint directory, a built-in name "
                       "(smollm2-135m, gemma3-270m, tiny-random) or a hub id (used as-is, needs network).")
    trust_remote_code: bool = field(False, help="Allow model repositories to run their own Python code.")
    dtype: str = field("auto", help="Weights dtype: auto (float32), float32, bfloat16, float16, or "
                       "float64 (slow; for exact numerical checks).", choices=DTYPES)

    def __post_init__(self):
        _parent_post_init(self, ModelOptions)

    def load_model(self, device: str | None = None):
        """(model, tokenizer) as these options describe; ``device="default"``: CUDA when there is one."""
        from .models import default_device, load_model
        return load_model(self.model, dtype=self.dtype, trust_remote_code=self.trust_remote_code,
                          device=default_device() if device == "default" else device)


@dataclass
class PromptOptions:
    task: str = field("generic", help="Prompt template: " + ", ".join(TASKS) + ".", choices=tuple(TASKS))
    k: int = field(4, help="Profile items retrieved into the prompt (top-k).")
    retriever: str = field("bm25", help="How profile items are ranked: bm25, recent, random, first, "
                           "or dense:<local encoder dir>.")
    max_length: int = field(1024, help="Max tokens of prompt + response; the profile is cut first, then "
                            "the input, and the response only with a counted warning.")
    seed: int = field(0, help="Random seed (retrieval=random, data order, initialization).")
    counterfactual_prompt: str = field(
        "input-only", help="What the profile-free prompt removes: input-only (the profile items AND the "
        "task's instruction sentence that refers to them; the prompt is the input alone) or keep-instruction "
        "(only the items; the instruction stays, so the prompts differ in the items alone).",
        choices=COUNTERFACTUAL_PROMPTS)

    def __post_init__(self):
        if self.task not in TASKS:
            raise UserError(f"task: unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.k < 0:
            raise UserError(f"k must be >= 0, got {self.k}")
        if self.max_length < 8:
            raise UserError(f"max_length must be >= 8, got {self.max_length}")
        _parent_post_init(self, PromptOptions)

    def prompt_builder(self, tokenizer, task: str | None = None, **overrides):
        """The ``PromptBuilder`` these options describe (one place, so every command builds
        prompts the same way); ``task`` overrides ``self.task`` (compare's cross-task eval sets)."""
        from .encoding import PromptBuilder
        from .prompts import get_task
        kw = dict(k=self.k, retriever=self.retriever, max_length=self.max_length, seed=self.seed,
                  counterfactual_prompt=self.counterfactual_prompt)
        kw.update(overrides)
        return PromptBuilder(tokenizer, get_task(task or self.task), **kw)


@dataclass
class ModelDataOptions(ModelOptions, PromptOptions):
    data: str = field("", help="Records in the LongLaMP format: a .jsonl/.json/.parquet file, "
                      "builtin:sample-train / builtin:sample-test, or longlamp:<config>[:split] / lamp:... specs.")
    limit: int | None = field(None, help="Use only the first N records.")

    def __post_init__(self):
        if not self.data:
            raise UserError("--data is required (a records file, or builtin:sample-train)")
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit must be >= 1, got {self.limit}")
        _parent_post_init(self, ModelDataOptions)


def check_clip(clip_min: float, clip_max: float, allow_negative: bool = False) -> None:
    if clip_min > clip_max:
        raise UserError(f"clip_min ({clip_min}) must be <= clip_max ({clip_max})")
    if clip_min < 0 and not allow_negative:
        raise UserError(f"clip_min {clip_min} < 0 turns negative-PIR tokens into gradient ascent; "
                        "pass --allow-negative-clip to force it")


@dataclass
class LossOptions:
    """The training loss; ``PerCETrainer`` takes this object as it is (no copy of the fields)."""
    method: str = field("perce", help="Loss: ce (plain), perce (PIR weights, the paper), lossce (weights "
                        "from the token loss), entce (weights from predictive entropy), jsd (NextQuill-style: "
                        "Jensen-Shannon divergence between the with-profile and profile-free next-token "
                        "distributions, over its mean on the batch's response tokens), threshold (NextQuill-"
                        "style: clip_max where PIR > --threshold-margin, clip_min elsewhere), nextquill (NextQuill "
                        "as its released code trains: weight 0.9 where p_with - p_without of the gold token > 0.05, "
                        "0.1 elsewhere, divided by their sum, plus 0.1 x CE of the logit difference z_with - "
                        "z_without), dft (TRL's Dynamic Fine-Tuning: -p * log p with p detached, over response "
                        "tokens). The weights of lossce, entce, perce, jsd and threshold are clipped to [clip_min, "
                        "clip_max]; nextquill and dft use neither the clip nor --normalize. All weights are held "
                        "constant for autograd.", choices=METHODS)
    threshold_margin: float = field(0.693, help="threshold: the PIR (nats) above which a token gets clip_max "
                                    "(0.693 = ln 2: the profile at least doubled its probability).")
    clip_min: float = field(0.8, help="m: lower clip of the token weights (the paper's 0.8).")
    clip_max: float = field(5.0, help="M: upper clip of the token weights (the paper's 5.0).")
    allow_negative_clip: bool = field(False, help="Permit clip_min < 0 (negative-PIR tokens then get "
                                      "gradient ascent; never tried in the paper).")
    normalize: str = field("tokens", help="Divide the weighted sum by the number of response tokens "
                           "(tokens, the paper's -1/n) or by the sum of weights (weights).",
                           choices=("tokens", "weights"))
    refresh: str = field("step", help="When PerCE weights are re-estimated: every step (step, the paper's "
                         "bootstrap), every_k (re-estimated on steps divisible by --refresh-every, each "
                         "example's cached PIR reused in between; ours) or once (first time an example is "
                         "seen; ours).", choices=("step", "every_k", "once"))
    refresh_every: int = field(4, help="k for --refresh every_k.")
    on_nonfinite: str = field("stop", help="A non-finite loss or weight stops the run (stop) or skips the "
                              "micro-batch and counts it (skip).", choices=("stop", "skip"))
    fast: bool = field(True, help="The fast implementation (response positions only through the LM head); "
                       "--no-fast runs the naive reference (full logits in both passes): same numbers, slower.")

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.refresh not in ("step", "every_k", "once"):
            raise UserError(f"refresh must be step, every_k or once, got {self.refresh!r}")
        if self.refresh_every < 1:
            raise UserError(f"refresh_every must be >= 1, got {self.refresh_every}")
        check_clip(self.clip_min, self.clip_max, self.allow_negative_clip)
        _parent_post_init(self, LossOptions)


@dataclass
class DecodingOptions:
    max_new_tokens: int = field(128, help="Max tokens generated per example.")
    do_sample: bool = field(False, help="Sample instead of greedy decoding.")
    temperature: float = field(1.0, help="Sampling temperature (with --do-sample).")
    top_p: float = field(1.0, help="Nucleus sampling mass (with --do-sample).")
    repetition_penalty: float = field(1.0, help="Repetition penalty (1.0: none).")
    no_repeat_ngram_size: int = field(0, help="Ban any token that would complete an N-gram already present in "
                                      "the row's own generated continuation (0: off). Only generated tokens "
                                      "count, not the prompt: copying a phrase of the profile or the input is "
                                      "allowed, repeating one the model already wrote is not (transformers' "
                                      "no_repeat_ngram_size counts the prompt too). Works in every decoding "
                                      "path: greedy, sampling, --contrast-alpha.")
    batch_size: int = field(16, help="Prompts generated together (left-padded, KV cache); 0: as many as fit a "
                            "quarter of the free memory (KV cache, logits and a layer's activations per row, at "
                            "most 64), chosen per call from the longest prompt; on 2 CPU cores a decode step "
                            "costs about the same at batch 16 and 64, so larger batches generate faster.")
    contrast_alpha: float = field(0.0, help="Profile-contrastive decoding (0: off): each step scores token v by "
                                  "s(v) = log p(v | profile, x, y<t) + A * [log p(v | profile, x, y<t) - "
                                  "log p(v | x, y<t)], i.e. the with-profile log-prob plus A times the token's "
                                  "PIR (classifier-free guidance with the profile as the context, gamma = 1 + A). "
                                  "Both prompts of every row run in one batched forward per step.")
    contrast_plausibility: float = field(0.1, help="With --contrast-alpha: only tokens whose with-profile "
                                         "probability is at least this fraction of the top token's are eligible "
                                         "(the plausibility guard of contrastive decoding; 0: off).")
    contrast_counterfactual: str = field(
        "remove", help="With --contrast-alpha: what the profile is contrasted with. remove: the same request "
        "without the profile (see --counterfactual-prompt), s(v) = log p(v | profile, x, y<t) + A * "
        "[log p(v | profile, x, y<t) - log p(v | x, y<t)], 'this user rather than no user'; swap: the same "
        "request with another user's profile p', s(v) = log p(v | profile, x, y<t) + A * "
        "[log p(v | profile, x, y<t) - log p(v | p', x, y<t)], 'this user rather than any user'. The other "
        "user is chosen as 'score --counterfactual swap' chooses it: per record, by --seed, among the users "
        "of the records given (after --limit). No effect at --contrast-alpha 0.",
        choices=("remove", "swap"))

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 0:
            raise UserError("max_new_tokens must be >= 1 and batch_size >= 1 (or 0: chosen from memory)")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.repetition_penalty <= 0:
            raise UserError("need temperature > 0, 0 < top_p <= 1, repetition_penalty > 0")
        if self.contrast_alpha < 0 or not 0 <= self.contrast_plausibility <= 1:
            raise UserError("need contrast_alpha >= 0 and 0 <= contrast_plausibility <= 1")
        if self.no_repeat_ngram_size < 0:
            raise UserError(f"no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        if self.contrast_counterfactual not in ("remove", "swap"):
            raise UserError(f"contrast_counterfactual must be remove or swap, got {self.contrast_counterfactual!r}")
        if self.contrast_alpha > 0 and self.repetition_penalty != 1.0:
            raise UserError("--contrast-alpha does not combine with --repetition-penalty (not implemented)")
        _parent_post_init(self, DecodingOptions)

    @property
    def plain_greedy(self) -> bool:
        """Our own batched greedy loop applies (with or without the n-gram ban); anything else goes
        through ``model.generate``."""
        return not self.do_sample and self.repetition_penalty == 1.0

    @property
    def contrastive(self) -> bool:
        return self.contrast_alpha > 0

    def refuse_unused_contrast_options(self) -> None:
        """For one-run commands (generate, eval): --contrast-counterfactual swap without --contrast-alpha
        would silently decode plainly. (Not checked in ``__post_init__``: an alpha grid that includes 0
        shares the other decoding settings.)"""
        if self.contrast_counterfactual != "remove" and not self.contrastive:
            raise UserError(f"--contrast-counterfactual {self.contrast_counterfactual} only changes "
                            "contrastive decoding; give --contrast-alpha > 0")

    def generate_kwargs(self, tokenizer, end_ids: set[int] | None = None) -> dict:
        """``model.generate`` arguments; ``end_ids`` (default: the tokenizer's EOS) all stop a row.
        transformers' own ``no_repeat_ngram_size`` (it counts the prompt) is switched off, also where
        the model's generation config sets it; ``generation._hf_generate_batch`` adds our n-gram ban
        (generated tokens only) as a logits processor, since it needs the prompt length."""
        stop = sorted(end_ids) if end_ids else tokenizer.eos_token_id
        kw = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
              "repetition_penalty": self.repetition_penalty, "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": stop, "use_cache": True, "no_repeat_ngram_size": 0}
        if self.do_sample:
            kw.update(temperature=self.temperature, top_p=self.top_p)
        else:  # silence "temperature is set but do_sample=False" from the model's own generation config
            kw.update(temperature=None, top_p=None, top_k=None)
        return kw


@dataclass
class JudgeOptions:
    """The LLM judge of personalization (``judge.py``); off unless ``judge`` is given."""
    judge: str | None = field(None, help="LLM judge of personalization (G-Eval style, 1-5, the probability-"
                              "weighted digit score sum s*p(s)): a --model-style spec run locally (a checkpoint "
                              "folder, a hub id, smollm2-135m) or an OpenAI-compatible server's base URL "
                              "(http://127.0.0.1:8000/v1, e.g. vllm serve). The built-in smollm2-135m (135M "
                              "parameters) is NOT a meaningful judge: use it only to test the plumbing.")
    judge_model: str | None = field(None, help="With a server --judge: the served model name (default: the "
                                    "server's only model, from /models).")
    judge_api: str = field("chat", help="With a server --judge: chat (/chat/completions, logprobs + "
                           "top_logprobs=20) or completions (/completions, logprobs=20, the rubric as plain text).",
                           choices=("chat", "completions"))
    judge_api_key_env: str = field("OPENAI_API_KEY", help="With a server --judge: the environment variable "
                                   "holding its API key (sent as a Bearer token when set; never stored).")
    judge_timeout: float = field(60.0, help="With a server --judge: seconds per request.")
    judge_retries: int = field(2, help="With a server --judge: retries of a request after a connection error, "
                               "timeout or 5xx (backoff 0.5 s, 1 s, 2 s, ...).")
    judge_batch_size: int = field(4, help="Judge prompts per forward (local) or requests in flight (server).")
    judge_dtype: str = field("auto", help="With a local --judge: weights dtype.", choices=DTYPES)

    def __post_init__(self):
        if self.judge is not None:
            self.judge = self.judge.strip() or None
        if self.judge is not None:
            from .judge import is_server, normalize_base_url
            if is_server(self.judge):
                normalize_base_url(self.judge)   # a malformed URL is refused now, before any work
        if self.judge_timeout <= 0 or self.judge_retries < 0 or self.judge_batch_size < 1:
            raise UserError("need judge_timeout > 0, judge_retries >= 0 and judge_batch_size >= 1")
        if self.judge_api not in ("chat", "completions"):
            raise UserError(f"judge_api must be chat or completions, got {self.judge_api!r}")
        _parent_post_init(self, JudgeOptions)

    def _server_judge(self):
        """The server judge these options name, built once (not a field: never in YAML or asdict), so
        the model it resolved for judge_description is the one make_judge hands out."""
        j = self.__dict__.get("_server")
        if j is None:
            from .judge import ServerJudge
            j = self.__dict__["_server"] = ServerJudge(
                self.judge, model=self.judge_model, api=self.judge_api, api_key_env=self.judge_api_key_env,
                timeout=self.judge_timeout, retries=self.judge_retries, concurrency=self.judge_batch_size)
        return j

    def judge_description(self) -> dict | None:
        """What decides the judge's scores (compare hashes it into every cell), without loading a
        local judge; a server is asked for its model name once when --judge-model is not given."""
        if self.judge is None:
            return None
        from .judge import is_server, local_description
        if not is_server(self.judge):
            return local_description(self.judge, self.judge_dtype)
        j = self._server_judge()
        j.resolve_model()   # asks the server once, when --judge-model is not given
        return j.describe()

    def make_judge(self, trust_remote_code: bool = False):
        """The judge these options describe, checked (a server reached and returning log-probs, a
        local model loaded), or None."""
        if self.judge is None:
            return None
        from .judge import LocalJudge, is_server
        if is_server(self.judge):
            j = self._server_judge()
        else:
            j = LocalJudge(self.judge, dtype=self.judge_dtype, trust_remote_code=trust_remote_code,
                           batch_size=self.judge_batch_size)
        j.check()
        return j
