"""PerContrast: PIR against a hand computation, and identical response ids in both passes."""
import torch

from percontrast.encoding import PairedCollator, PromptBuilder
from percontrast.pir import pir, token_entropy, token_logprobs
from percontrast.scoring import score_batch


def test_pir_is_difference_of_logprobs():
    a = torch.tensor([[-1.0, -2.0, -0.5]])
    b = torch.tensor([[-1.5, -1.0, -0.5]])
    assert torch.equal(pir(a, b), torch.tensor([[0.5, -1.0, 0.0]]))


def test_token_logprobs_matches_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    t = torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.log_softmax(logits, -1).gather(-1, t[..., None]).squeeze(-1)
    # float32: both sides are a log-sum-exp of 11 terms of size <= e^4 plus one subtraction, each a
    # few roundings of values below 8, so they agree to ~8 * 2**-24 * 4 = 2e-6; use float64 to be exact
    ref64 = torch.log_softmax(logits.double(), -1).gather(-1, t[..., None]).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits.double(), t), ref64, rtol=0, atol=1e-13)
    torch.testing.assert_close(token_logprobs(logits, t), ref, rtol=0, atol=8 * 4 * 2.0 ** -24)


def test_entropy_uniform_is_log_v():
    # float64: log 7 through a log_softmax of 7 zeros, a handful of roundings of values near 2
    assert abs(token_entropy(torch.zeros(1, 1, 7, dtype=torch.float64)).item() - torch.log(
        torch.tensor(7.0, dtype=torch.float64)).item()) < 1e-14


def _hand_logprobs(model, prompt, response):
    """Straightforward reference: one unpadded sequence, full logits, log_softmax."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)
    P = len(prompt)
    return torch.stack([logp[P - 1 + i, tok] for i, tok in enumerate(response)])


def test_pir_matches_hand_computation_on_tiny_model(sample_train, email_task):
    # float64 model: the batched, left-padded fast path and the unpadded full-logit reference differ
    # only in summation order (see test_fastpath.TOL), so 1e-9 is a derived bound, not a lucky one
    from percontrast.models import load_model
    model, tok = load_model("tiny-random", dtype="float64")
    model.eval()
    builder = PromptBuilder(tok, email_task, k=2)
    enc = [builder.encode(r) for r in sample_train[:3]]
    batch = PairedCollator(tok.pad_token_id)(enc)
    scores = score_batch(model, batch)
    for b, e in enumerate(enc):
        n = len(e["response"])
        want = _hand_logprobs(model, e["prompt_with"], e["response"]) - \
            _hand_logprobs(model, e["prompt_without"], e["response"])
        torch.testing.assert_close(scores.pir[b, :n], want, rtol=0, atol=1e-9)
        assert scores.mask[b, :n].all() and not scores.mask[b, n:].any()


def test_response_ids_identical_in_both_passes(tiny, email_task):
    _, tok = tiny
    builder = PromptBuilder(tok, email_task, k=1)
    # A response starting with spaces merges with the chat template's trailing "\n" under
    # joint tokenization; we tokenize the response on its own and concatenate ids.
    response = "  spaced reply"
    rec = {"id": "x", "input": "Write a reply", "output": response,
           "profile": [{"title": "t", "text": "some text"}]}
    e = builder.encode(rec)
    alone = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert e["response"] == alone
    rendered = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                       add_generation_prompt=True)
    joint = tok(rendered + response, add_special_tokens=False)["input_ids"]
    prompt_only = tok(rendered, add_special_tokens=False)["input_ids"]
    assert joint != prompt_only + alone[:-1], "fixture no longer exercises a boundary merge"
    batch = PairedCollator(tok.pad_token_id)([e])
    P, Pc, R = int(batch["resp_start"]), int(batch["cf_resp_start"]), len(alone)
    assert batch["input_ids"][0, P:P + R].tolist() == alone
    assert batch["cf_input_ids"][0, Pc:Pc + R].tolist() == alone
    assert batch["response_ids"][0].tolist() == alone


def test_input_only_counterfactual_is_the_input_alone(email_task, sample_train):
    """The default counterfactual drops the profile items AND the task instruction that refers to them."""
    from percontrast.prompts import counterfactual_prompt, get_task, personalized_prompt
    r = sample_train[0]
    items = r["profile"][:2]
    with_p = personalized_prompt(email_task, items, r["input"])
    without = counterfactual_prompt(email_task, r["input"])
    assert with_p.endswith(r["input"]) and without == r["input"]
    assert items[0]["text"] in with_p and items[0]["text"] not in without
    task = get_task("abstract_generation")
    item = {"title": "T", "abstract": "an abstract"}
    assert "Use the above abstracts" in personalized_prompt(task, [item], "Generate an abstract")
    assert counterfactual_prompt(task, "Generate an abstract") == "Generate an abstract"


def test_keep_instruction_counterfactual_differs_in_the_items_only():
    from percontrast.prompts import counterfactual_prompt, get_task, personalized_prompt
    task = get_task("abstract_generation")
    item = {"title": "T", "abstract": "an abstract"}
    with_p = personalized_prompt(task, [item], "Generate an abstract")
    without = counterfactual_prompt(task, "Generate an abstract", keep_instruction=True)
    assert without.startswith("Use the above abstracts as context") and without.endswith("Generate an abstract")
    assert with_p.endswith(without)                       # the with-profile prompt = items + ". " + this
    assert "an abstract\"" not in without and "an abstract" in with_p


def test_builder_keep_instruction_reaches_the_ids(tiny):
    from percontrast.prompts import get_task
    _, tok = tiny
    rec = {"id": "a", "input": "Generate an abstract for the title X", "output": "Y",
           "profile": [{"title": "T", "abstract": "an abstract"}]}
    plain = PromptBuilder(tok, get_task("abstract_generation"), k=1).encode(rec)
    keep = PromptBuilder(tok, get_task("abstract_generation"), k=1,
                         counterfactual_prompt="keep-instruction").encode(rec)
    assert plain["prompt_with"] == keep["prompt_with"] and plain["response"] == keep["response"]
    assert "Use the above abstracts" in tok.decode(keep["prompt_without"])
    assert "Use the above abstracts" not in tok.decode(plain["prompt_without"])
