"""PerCE inside TRL: ``PerCESFTConfig`` (TRL's ``SFTConfig`` plus the PerCE loss options) and
``PerCESFTTrainer`` (TRL's ``SFTTrainer`` whose loss is ``trainer.PerCELossMixin``, the very E-step,
weights and per-example cache ``PerCETrainer`` uses; only the data plumbing here is TRL's).

    from percontrast.trl_sft import PerCESFTConfig, PerCESFTTrainer
    trainer = PerCESFTTrainer(model, args=PerCESFTConfig(output_dir="out", method="perce"), train_dataset=ds)

Datasets: TRL's prompt-completion type, standard (``prompt`` / ``completion`` strings) or
conversational (message lists), plus ONE column that defines the counterfactual, the way TRL's
self-distillation trainers take their ``privileged_context`` column:

  ``profile``                the user's profile items, strings (used as they are) or dicts (rendered by
                             ``task``'s template, ``prompts.py``). The with-profile prompt is the profile
                             block followed by ``prompt`` (in a conversation: inside its last user turn);
                             the counterfactual is ``prompt`` itself.
  ``counterfactual_prompt``  the counterfactual, of the same type as ``prompt``: ``prompt`` already holds the
                             profile, this column is the same request without it.

Token alignment. SFTTrainer tokenizes the prompt and prompt+completion as two strings and trains
on the tokens after their common prefix, so a token that merges across the boundary (prompt
"...Answer: " + completion "Lisbon" -> " Lisbon") is cut differently after each prompt, and part
of the prompt's text can become a "completion" token. PIR compares log p of the SAME token ids
under the two prompts, so here each prompt is tokenized as TRL tokenizes a prompt, the completion
is tokenized ON ITS OWN, and its ids are appended to both (as ``encoding.PromptBuilder`` does):
the two sequences share the completion ids by construction and the text is kept exactly. In a
conversation the completion is the text the chat template adds after the generation prompt (the
assistant content and its end-of-turn markers); a standard completion gets EOS, as TRL adds it.

Truncation follows TRL's ``keep_start``: a sequence longer than ``max_length`` loses the end of its
completion (the same ids in both prompts), and an example whose with-profile prompt alone fills
``max_length`` is dropped; both are counted in a warning.

Offline weights (``percontrast export-weights``). A dataset with ``input_ids``, ``weights`` and
``completion_mask`` (or ``labels``) columns, such as the export's ``dataset/`` folder, is trained on
as it is: loss = sum_i w_i * nll_i / n with the stored weights, n the response tokens of the optimizer
step, through ``losses.weighted_nll`` (the online path's rule), and NO E-step. Those weights were
estimated once, with a fixed model, before training: this project's ``refresh=once``-style variant,
not the paper's bootstrap (which re-estimates PIR with the model being trained at every step). So
such a dataset needs ``method="perce"`` and ``refresh="once"`` in the config (a run's saved arguments
then say what it was), and, when the dataset carries the export's metadata, the export's clip.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from dataclasses import dataclass
from types import MappingProxyType

import torch
from accelerate import PartialState

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as e:   # trl is an optional dependency of percontrast
    raise ImportError(f"percontrast.trl_sft needs TRL ({e}): pip install 'percontrast[trl]'") from None

from .checkpointing import AtomicCheckpointMixin
from .encoding import PairedCollator
from .errors import UserError
from .losses import weighted_nll
from .options import LossOptions, PromptOptions
from .prompts import TASKS, get_task, personalized_prompt
from .trainer import PerCELossMixin
from .weights_export import export_metadata, read_example

logger = logging.getLogger(__name__)

COUNTERFACTUAL_COLUMNS = ("profile", "counterfactual_prompt")
PREPARED_COLUMNS = ("prompt_with", "prompt_without", "response", "idx")   # what PairedCollator reads
OFFLINE_PREPARED_COLUMNS = ("prompt_with", "response", "weights", "idx")   # what OfflineWeightsCollator reads
OFFLINE_LABEL = ("offline weights: clip(PIR) estimated once with a fixed model before training (this project's "
                 "refresh=once-style variant, NOT the paper's every-step bootstrap); no E-step runs")


class PerCESFTError(UserError, ValueError):
    """A call PerCESFTTrainer cannot train correctly: one line that says what to change. A
    ``ValueError`` as TRL's own refusals are, and a ``UserError`` as the rest of percontrast's."""


def _hf_metadata(metadata) -> MappingProxyType:
    # HfArgumentParser / TrlParser hand a field's metadata to argparse as keyword arguments;
    # percontrast.config.field also stores a "positional" key, which argparse would refuse.
    return MappingProxyType({k: v for k, v in metadata.items() if k in ("help", "choices")})


def _declared(group: type, name: str):
    """The field ``name`` as ``group`` declares it (default, help, choices), for a config that cannot
    inherit the whole group (``PromptOptions`` also declares ``max_length`` and ``seed``, which
    ``SFTConfig`` has with other meanings): still one declaration, no copied help text."""
    f = {f.name: f for f in dataclasses.fields(group)}[name]
    return dataclasses.field(default=f.default, metadata=_hf_metadata(f.metadata))


@dataclass
class PerCESFTConfig(SFTConfig, LossOptions):
    """``SFTConfig`` plus the PerCE loss options, inherited from ``options.LossOptions`` (method,
    clip_min, clip_max, normalize, refresh, refresh_every, on_nonfinite, fast, ...), with their
    defaults (the paper's: perce, m = 0.8, M = 5.0, weights refreshed every step) and validation.
    Options that cannot work with a paired, completion-only loss are refused here, at construction."""

    task: str = _declared(PromptOptions, "task")

    def __post_init__(self):
        super().__post_init__()           # SFTConfig -> TrainingArguments
        LossOptions.__post_init__(self)   # TrainingArguments.__post_init__ does not pass on to the next base
        if self.task not in TASKS:
            raise PerCESFTError(f"task: unknown task {self.task!r}; known: {', '.join(TASKS)}")
        refused = [
            (self.packing or getattr(self, "eval_packing", None), "packing=True puts several examples in one "
             "row, and PerCE needs each example's completion under two prompts: set packing=False (and eval_packing)"),
            (self.padding_free, "padding_free=True flattens the batch into one row, and PerCE needs each "
             "example's completion under two prompts: set padding_free=False"),
            (self.completion_only_loss is False, "completion_only_loss=False would train on the prompt, where "
             "PIR is not defined (the two prompts differ there): leave completion_only_loss at None or True"),
            (self.assistant_only_loss, "assistant_only_loss=True is for language-modeling conversations; with "
             "prompt-completion data the loss is already on the completion only: set assistant_only_loss=False"),
            (self.loss_type != "nll", f"loss_type={self.loss_type!r} reweights tokens on its own; the PerCE "
             "weighting is chosen by method=...: leave loss_type='nll'"),
            (self.label_smoothing_factor > 0, "label_smoothing_factor > 0 is not part of the PerCE loss: set it to 0"),
            (getattr(self, "truncation_mode", "keep_start") != "keep_start", "truncation_mode='keep_end' cuts the "
             "start of the sequence, i.e. the two prompts differently: use truncation_mode='keep_start'"),
            (getattr(self, "pad_to_multiple_of", None) is not None, "pad_to_multiple_of is not supported: the "
             "paired collator lays out its own batches (completions aligned across rows); leave it unset"),
            (bool((self.dataset_kwargs or {}).get("skip_prepare_dataset")), "dataset_kwargs skip_prepare_dataset "
             "is not supported: PerCESFTTrainer must tokenize the prompt, the counterfactual and the completion "
             "itself (see percontrast.trl_sft); drop skip_prepare_dataset"),
        ]
        for bad, why in refused:
            if bad:
                raise PerCESFTError(why)


# HfArgumentParser reads the fields' metadata (see _hf_metadata); the inherited LossOptions fields get
# clean copies here, so LossOptions itself (and percontrast's CLI, which reads it) stays as it is.
for _f in dataclasses.fields(LossOptions):
    _own = copy.copy(PerCESFTConfig.__dataclass_fields__[_f.name])
    _own.metadata = _hf_metadata(_f.metadata)
    PerCESFTConfig.__dataclass_fields__[_f.name] = _own
del _f, _own


# ----------------------------------------------------------------------------- dataset checks
def _kind(value) -> str | None:
    """'text' for a string, 'chat' for a list of messages, None for anything else."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and all(isinstance(m, dict) and "role" in m for m in value):
        return "chat"
    return None


def check_dataset(dataset, name: str) -> str:
    """Refuse, in one line, a dataset PerCE cannot train on; return its counterfactual column, or
    ``"weights"`` for a pre-tokenized dataset of offline weights (``percontrast export-weights``)."""
    from datasets import Dataset
    if not isinstance(dataset, Dataset):
        raise PerCESFTError(f"{name}: PerCESFTTrainer needs a datasets.Dataset (the PIR cache is keyed by row), got "
                            f"{type(dataset).__name__}; materialize it, e.g. Dataset.from_list(list(...))")
    cols = set(dataset.column_names)
    if "weights" in cols or ("input_ids" in cols and "pir" in cols):
        return _check_offline_dataset(dataset, name, cols)
    if "input_ids" in cols:
        raise PerCESFTError(f"{name}: the dataset is already tokenized; PerCE tokenizes the prompt, its counterfactual "
                            "and the completion itself: pass the text columns prompt, completion and profile or "
                            "counterfactual_prompt (or, for offline weights, a percontrast export-weights dataset "
                            "with a 'weights' column)")
    if cols & {"image", "images"}:
        raise PerCESFTError(f"{name}: vision datasets are not supported by PerCESFTTrainer; use text prompts")
    if not {"prompt", "completion"} <= cols:
        got = ("a language-modeling dataset (" + ", ".join(sorted(cols & {"text", "messages"})) + ")"
               if cols & {"text", "messages"} else f"columns {sorted(cols)}")
        raise PerCESFTError(f"{name}: PerCE needs a prompt-completion dataset (columns 'prompt' and 'completion'), "
                            f"got {got}; split each example into the prompt and the completion to train on")
    found = [c for c in COUNTERFACTUAL_COLUMNS if c in cols]
    if len(found) != 1:
        raise PerCESFTError(f"{name}: needs exactly one of the columns 'profile' (the user's profile items) or "
                            "'counterfactual_prompt' (the prompt without the profile), got "
                            + ("both" if found else f"neither (columns {sorted(cols)})"))
    if len(dataset) == 0:
        raise PerCESFTError(f"{name}: the dataset is empty")
    _check_row(dataset[0], 0, name, found[0])
    return found[0]


def _check_offline_dataset(dataset, name: str, cols: set) -> str:
    missing = [c for c in ("input_ids", "weights") if c not in cols]
    if missing:
        raise PerCESFTError(f"{name}: a dataset of offline weights needs the columns 'input_ids' and 'weights' "
                            f"(as percontrast export-weights writes them), missing {missing}")
    if not cols & {"completion_mask", "labels"}:
        raise PerCESFTError(f"{name}: a dataset of offline weights needs 'completion_mask' or 'labels' (-100 on the "
                            "prompt) to tell the completion from the prompt")
    if cols & {"image", "images"}:
        raise PerCESFTError(f"{name}: vision datasets are not supported by PerCESFTTrainer; use text prompts")
    if len(dataset) == 0:
        raise PerCESFTError(f"{name}: the dataset is empty")
    return "weights"


def check_offline_args(args: PerCESFTConfig, meta: dict | None, name: str) -> None:
    """Refuse, in one line, a config that would mislabel or misuse a dataset of offline weights."""
    if args.method != "perce":
        raise PerCESFTError(f"{name} holds offline PerCE weights (clip(PIR), percontrast export-weights), but "
                            f"method={args.method!r} computes its own weights online: set method='perce', or train "
                            "on text columns (prompt, completion, profile) for the other methods")
    if args.refresh != "once":
        raise PerCESFTError(f"{name} holds offline weights, estimated once before training: that is this project's "
                            f"refresh=once variant, not refresh={args.refresh!r} (the paper's bootstrap re-estimates "
                            "PIR every step): set refresh='once' so the run says what it is, or train on text "
                            "columns (prompt, completion, profile) for the every-step E-step")
    if meta is not None and (meta.get("clip_min"), meta.get("clip_max")) != (args.clip_min, args.clip_max):
        raise PerCESFTError(f"{name} was exported with clip_min={meta.get('clip_min')}, "
                            f"clip_max={meta.get('clip_max')} (its export_info), but the config has "
                            f"clip_min={args.clip_min}, clip_max={args.clip_max}: set the export's clip, or export "
                            "again with this one")


def encode_offline_example(row: dict, idx: int, *, vocab_size: int, max_length: int | None,
                           dataset_name: str) -> dict:
    """One exported row -> what ``OfflineWeightsCollator`` reads (``prompt_with``, ``response``,
    ``weights`` per completion token, ``idx``) plus the bookkeeping ``encode_example`` returns."""
    where = f"{dataset_name} row {idx}" + (f" (id {row['id']})" if row.get("id") is not None else "")
    try:
        prompt, response, weights = read_example(row)
    except ValueError as e:
        raise PerCESFTError(f"{where}: {e}") from None
    top = max(prompt + response)
    if top >= vocab_size:
        raise PerCESFTError(f"{where}: token id {top} is outside the tokenizer's {vocab_size} ids; train with the "
                            "tokenizer the weights were exported with")
    cut, dropped = 0, False
    if max_length is not None:   # TRL's keep_start, as encode_example: the completion's end (and its weights) go
        room = max_length - len(prompt)
        if room <= 0:
            dropped = True
        elif len(response) > room:
            cut, response, weights = len(response) - room, response[:room], weights[:room]
    return {"prompt_with": prompt, "response": response, "weights": [float(w) for w in weights], "idx": idx,
            "cut_tokens": cut, "dropped": dropped, "profile_empty": False}


def _check_row(row: dict, i: int, name: str, column: str) -> str:
    where = f"{name} row {i}"
    kind = _kind(row["prompt"])
    if kind is None:
        raise PerCESFTError(f"{where}: 'prompt' must be a string or a list of messages, "
                            f"got {type(row['prompt']).__name__}")
    if _kind(row["completion"]) != kind:
        raise PerCESFTError(f"{where}: 'completion' must be of the prompt's type "
                            f"({'a string' if kind == 'text' else 'a list of messages'})")
    if column == "counterfactual_prompt" and _kind(row[column]) != kind:
        raise PerCESFTError(f"{where}: 'counterfactual_prompt' must be of the prompt's type "
                            f"({'a string' if kind == 'text' else 'a list of messages'})")
    if column == "profile" and not isinstance(row["profile"], list):
        raise PerCESFTError(f"{where}: 'profile' must be a list of profile items (strings or dicts), "
                            f"got {type(row['profile']).__name__}")
    return kind


# ----------------------------------------------------------------------------- tokenization
def profile_prompt(prompt, items: list, task_name: str, where: str):
    """The with-profile prompt: the profile block before the request (``prompts.personalized_prompt``,
    so it reads as ``percontrast train`` writes it), inside the last user turn of a conversation."""
    task = get_task(task_name)
    for it in items:
        if isinstance(it, dict):
            missing = [f for f in task.fields if it.get(f) is None]
            if missing:
                raise PerCESFTError(f"{where}: a profile item lacks the field(s) {missing} that task "
                                    f"{task.name!r} renders; pass task='generic' or complete the items")
        elif not isinstance(it, str):
            raise PerCESFTError(f"{where}: profile items must be strings or dicts, got {type(it).__name__}")
    # A string item is already rendered; a dict goes through the task's template.
    as_given = dataclasses.replace(task, render_item=lambda it: it if isinstance(it, str) else task.render_item(it))
    if isinstance(prompt, str):
        return personalized_prompt(as_given, items, prompt)
    last = prompt[-1]
    if last.get("role") != "user" or not isinstance(last.get("content"), str):
        raise PerCESFTError(f"{where}: with a 'profile' column a conversational prompt must end with a user turn "
                            "whose content is a string (the profile goes there); give 'counterfactual_prompt' instead")
    return prompt[:-1] + [{**last, "content": personalized_prompt(as_given, items, last["content"])}]


def _chat_completion_ids(tokenizer, prompt: list, completion: list, kwargs: dict, where: str) -> list[int]:
    """The completion's ids in a conversation: the text the chat template adds after the generation
    prompt, tokenized on its own (so the ids do not depend on which prompt precedes them)."""
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    whole = tokenizer.apply_chat_template(prompt + completion, tokenize=False, **kwargs)
    if not whole.startswith(head):
        raise PerCESFTError(f"{where}: the chat template renders the prompt differently when a completion follows, "
                            "so the completion's text cannot be cut off the conversation; use a template whose "
                            "generation prompt is a prefix of the whole conversation")
    return tokenizer(whole[len(head):], add_special_tokens=False)["input_ids"]


def encode_example(row: dict, idx: int, *, tokenizer, column: str, task: str, max_length: int | None,
                   dataset_name: str) -> dict:
    """One row -> what ``PairedCollator`` reads (``prompt_with``, ``prompt_without``, ``response``,
    ``idx``) plus bookkeeping (``cut_tokens``, ``dropped``, ``profile_empty``). See the module docstring."""
    where = f"{dataset_name} row {idx}"
    kind = _check_row(row, idx, dataset_name, column)
    if column == "profile":
        with_p, without_p = profile_prompt(row["prompt"], row["profile"], task, where), row["prompt"]
    else:
        with_p, without_p = row["prompt"], row["counterfactual_prompt"]
    # The prompts are tokenized as SFTTrainer tokenizes a prompt (trl.data_utils._tokenize): through the chat
    # template with the generation prompt, or as plain text with the tokenizer's special tokens.
    if kind == "chat":
        tools = json.loads(row["tools"]) if isinstance(row.get("tools"), str) else row.get("tools")   # as TRL reads it
        kw = {"tools": tools, **(row.get("chat_template_kwargs") or {})}
        p_with, p_without = (tokenizer.apply_chat_template(p, tokenize=True, return_dict=True,
                                                           add_generation_prompt=True, **kw)["input_ids"]
                             for p in (with_p, without_p))
        response = _chat_completion_ids(tokenizer, with_p, row["completion"], kw, where)
    else:
        p_with, p_without = (tokenizer(text=p)["input_ids"] for p in (with_p, without_p))
        response = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        if not row["completion"].endswith(tokenizer.eos_token):
            response = response + [tokenizer.eos_token_id]
    cut, dropped = 0, False
    if max_length is not None:   # TRL's keep_start: the completion's end goes first
        room = max_length - len(p_with)
        if room <= 0:
            dropped = True
        elif len(response) > room:
            cut, response = len(response) - room, response[:room]
    return {"prompt_with": list(p_with), "prompt_without": list(p_without), "response": response, "idx": idx,
            "cut_tokens": cut, "dropped": dropped, "profile_empty": column == "profile" and not row["profile"]}


@dataclass
class OfflineWeightsCollator:
    """The with-profile half of ``PairedCollator``'s batch (the same aligned layout, so the with-profile
    forward is the very one the online path runs, logits on the completion window only) plus
    ``weights`` [B, R]: each completion token's stored weight, 0 on padding (outside the mask anyway)."""
    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        out = PairedCollator(self.pad_token_id, with_counterfactual=False)(features)
        # float64 holds float32 and float64 weights exactly; weighted_nll casts to the log-probs' dtype
        w = torch.zeros(out["response_mask"].shape, dtype=torch.float64)
        for b, f in enumerate(features):
            w[b, : len(f["weights"])] = torch.as_tensor(f["weights"], dtype=torch.float64)
        out["weights"] = w
        return out


# ----------------------------------------------------------------------------- the trainer
class PerCESFTTrainer(PerCELossMixin, AtomicCheckpointMixin, SFTTrainer):
    """``SFTTrainer`` with the PerCE loss. Takes what SFTTrainer takes (a model or a model id,
    ``peft_config``, callbacks, ...) with a ``PerCESFTConfig``; the datasets are prompt-completion
    ones with a ``profile`` or ``counterfactual_prompt`` column, or a ``percontrast export-weights``
    dataset of offline weights (``refresh=once``-style, no E-step; module docstring). Checkpoints are
    atomic and carry the PIR cache, as ``PerCETrainer``'s do."""

    _tag_names = ["trl", "sft", "percontrast", "perce"]
    _name = "PerCE SFT"

    def __init__(self, model, args: PerCESFTConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None,
                 peft_config=None, quantization_config=None, *, data_collator=None, compute_loss_func=None,
                 compute_metrics=None, preprocess_logits_for_metrics=None, formatting_func=None):
        if args is None:   # as SFTTrainer names its default run
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = PerCESFTConfig(f"{str(name).rstrip('/').split('/')[-1]}-PerCE")
        if not isinstance(args, PerCESFTConfig):
            raise PerCESFTError("args: PerCESFTTrainer needs a PerCESFTConfig (an SFTConfig with the PerCE options), "
                                f"got {type(args).__name__}")
        for name, value, why in (
                ("data_collator", data_collator, "batches are paired (with-profile / counterfactual) by "
                 "percontrast's PairedCollator"),
                ("compute_loss_func", compute_loss_func, "the loss is PerCE's (method=...)"),
                ("formatting_func", formatting_func, "it turns the data into a language-modeling dataset"),
                ("compute_metrics", compute_metrics, "evaluation reports the PerCE loss only"),
                ("preprocess_logits_for_metrics", preprocess_logits_for_metrics, "evaluation reports the "
                 "PerCE loss only")):
            if value is not None:
                raise PerCESFTError(f"{name} is not supported by PerCESFTTrainer: {why}; leave it unset")
        if train_dataset is None:
            raise PerCESFTError("train_dataset is required")
        offline = check_dataset(train_dataset, "train_dataset") == "weights"
        evals = eval_dataset if isinstance(eval_dataset, dict) else {"eval_dataset": eval_dataset}
        for name, ds in evals.items():
            if ds is not None and (check_dataset(ds, name) == "weights") != offline:
                # one collator and one loss per run: an online eval of an offline run would run E-steps
                raise PerCESFTError(f"{name}: is {'a text' if offline else 'an offline-weights'} dataset but "
                                    f"train_dataset is {'an offline-weights' if offline else 'a text'} one; give "
                                    "the evaluation data in the training data's form")
        # The export's export_info.json, when the dataset carries it (a load_from_disk of its dataset/ folder).
        self.offline_weights = offline   # before SFTTrainer.__init__, which may ask for the signature columns
        self.offline_weights_info = export_metadata(train_dataset) if offline else None
        if offline:
            check_offline_args(args, self.offline_weights_info, "train_dataset")
            for name, ds in evals.items():
                if ds is not None:
                    check_offline_args(args, export_metadata(ds), name)
        # Rows keep their position as ``idx`` (the cache key); an ``id`` column names them in errors.
        ids = [str(i) for i in train_dataset["id"]] if "id" in train_dataset.column_names else None
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, callbacks=callbacks, optimizers=optimizers,
                         optimizer_cls_and_kwargs=optimizer_cls_and_kwargs, peft_config=peft_config,
                         quantization_config=quantization_config, perce_args=args, example_ids=ids)
        # SFTTrainer built its language-modeling collator (and settled the pad token) in __init__;
        # the paired batches the PerCE loss reads come from PairedCollator instead.
        self.data_collator = (OfflineWeightsCollator if offline else PairedCollator)(self._tokenizer.pad_token_id)
        if offline:
            meta = self.offline_weights_info
            origin = (f"from model {meta.get('model')!r} ({meta.get('dtype')}), clip [{meta.get('clip_min')}, "
                      f"{meta.get('clip_max')}]" if meta else "with no export metadata (nothing to check them against)")
            logger.warning("PerCESFTTrainer: training on %s, %s", OFFLINE_LABEL, origin)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):
        cols = set(dataset.column_names)
        if set(PREPARED_COLUMNS) <= cols or set(OFFLINE_PREPARED_COLUMNS) <= cols:
            return dataset   # evaluate() prepares again what it is given
        column = check_dataset(dataset, dataset_name)
        if column == "weights":   # offline weights: already tokenized, only split, checked and cut
            fn, fn_kwargs = encode_offline_example, {"vocab_size": len(self._tokenizer)}
        else:
            fn, fn_kwargs = encode_example, {"tokenizer": self._tokenizer, "column": column, "task": args.task}
        state = PartialState()   # main process first, then the rest (as SFTTrainer prepares its datasets)
        with state.main_process_first(), state.local_main_process_first():
            dataset = dataset.map(
                fn, with_indices=True, remove_columns=dataset.column_names,
                fn_kwargs={**fn_kwargs, "max_length": args.max_length, "dataset_name": dataset_name},
                num_proc=args.dataset_num_proc, desc=f"PerCE: preparing {dataset_name} dataset")
        n = len(dataset)
        dropped, empty = sum(dataset["dropped"]), sum(dataset["profile_empty"])
        cut = [c for c in dataset["cut_tokens"] if c]
        if dropped or cut:
            logger.warning("max_length %s: dropped %d/%d %s examples whose with-profile prompt fills it, cut the "
                           "completion of %d (%d tokens); raise max_length", args.max_length, dropped, n,
                           dataset_name, len(cut), sum(cut))
        if empty:
            logger.warning("%d/%d %s examples have an empty profile: both prompts are the same, their PIR is 0 and "
                           "PerCE weights every token clip_min", empty, n, dataset_name)
        if dropped:
            dataset = dataset.filter(lambda d: not d, input_columns="dropped")
        dataset = dataset.remove_columns(["cut_tokens", "dropped", "profile_empty"])
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _set_signature_columns_if_needed(self):
        # remove_unused_columns keeps what the collator reads (the model's forward takes none of it), so the
        # offline ``weights`` column survives TRL's default remove_unused_columns=True.
        if self._signature_columns is None:
            self._signature_columns = list(OFFLINE_PREPARED_COLUMNS if self.offline_weights else PREPARED_COLUMNS)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "weights" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # Offline weights: the online M-step with the stored weights in place of clip(PIR), and no E-step.
        # The same with-profile log-probs (scoring.py) and the same rule (losses.weighted_nll, n =
        # num_items_in_batch, the response tokens of the optimizer step) as PerCELossMixin.compute_loss.
        mask = inputs["response_mask"]
        logp, logits = self._with_profile_forward(model, inputs)
        weights = inputs["weights"]   # checked finite when the dataset was prepared
        loss = weighted_nll(logp, weights, mask, self.perce.normalize, num_items_in_batch)
        loss = self._checked_and_scaled(model, inputs, loss, num_items_in_batch, {})
        if model.training and mask.any():
            m = mask.bool()
            self._perce_metrics["mean_weight"].append(weights.to(logp.dtype)[m].mean().item())
            self._perce_metrics["pir_refreshed"].append(0.0)   # no E-step: the weights are the export's
        return (loss, {"logits": logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The loss only: the logits PerCE computes cover the completion window alone, so they would not
        # line up with the labels that metrics expect (compute_metrics is refused for that reason).
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _send_telemetry(self):
        # percontrast makes no network calls of its own at run time (notes/CONVENTIONS.md).
        return None
