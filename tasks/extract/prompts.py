"""The texts an edit is computed on: prefixed edit prompts and the KL ("is a") prompts."""

from __future__ import annotations

import torch

from tasks.data import EditRequest
from tasks.extract.tokens import TokenBatch, build_batch

# Openers for the random context prefixes (MEMIT samples its prefixes from the model
# after these five words); "{}" alone is always the first template.
PREFIX_OPENERS = ("The", "Therefore", "Because", "I", "You")


@torch.no_grad()
def make_context_templates(lm, n_prefixes: int, prefix_tokens: int, seed: int,
                           open_prefixes: int = 0) -> list[str]:
    """["{}"] plus `n_prefixes` model-sampled prefixes ending in ". {}" (deterministic in seed).

    The last `open_prefixes` of them end in " {}" instead: the prompt runs on from the
    sampled words, so the subject follows words of its own sentence, as it does in about a
    third of CounterFact's paraphrases ("The twin city of Kharkiv is"). The sampled texts do
    not depend on `open_prefixes`."""
    tok = lm.tokenizer
    templates = ["{}"]
    if n_prefixes == 0:
        return templates
    with torch.random.fork_rng(devices=[]):   # the caller's random state is left as it was
        torch.manual_seed(seed)
        for i in range(n_prefixes):
            opener = PREFIX_OPENERS[i % len(PREFIX_OPENERS)]
            enc = tok(opener, return_tensors="pt").to(lm.model.device)
            out = lm.model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=prefix_tokens,
                                    pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0], skip_special_tokens=True)
            text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
            templates.append(text + (" {}" if i >= n_prefixes - open_prefixes else ". {}"))
    return templates


def template_prefix(template: str) -> str:
    """What a context template puts before the prompt: "" for "{}", the prefix for "... {}"."""
    return template[: template.index("{}")]


def rewrite_batch(tokenizer, requests: list[EditRequest], templates: list[str],
                  answer: str = "target_new") -> tuple[TokenBatch, torch.Tensor]:
    """Every request's prompt under every template, followed by " target_new" (or by the
    request's field `answer`, e.g. "ground_truth").

    Returns the batch (edit-major: row = edit * len(templates) + template) and the edit
    index of each row [B].
    """
    texts, subject_ends, target_starts, groups = [], [], [], []
    for e, req in enumerate(requests):
        for template in templates:
            prefix = template_prefix(template)
            texts.append(prefix + req.prompt + " " + getattr(req, answer))
            subject_ends.append(len(prefix) + req.subject_end)
            target_starts.append(len(prefix) + len(req.prompt))
            groups.append(e)
    batch = build_batch(tokenizer, texts, subject_ends, target_starts)
    return batch, torch.tensor(groups)


def kl_batch(tokenizer, requests: list[EditRequest]) -> TokenBatch:
    """"{subject} is a" per request: the distribution after it should not move."""
    texts = [req.subject + " is a" for req in requests]
    return build_batch(tokenizer, texts, [len(req.subject) for req in requests])


def prompt_batch(tokenizer, requests: list[EditRequest]) -> TokenBatch:
    """The bare edit prompt per request (where the residual to write is measured)."""
    return build_batch(tokenizer, [req.prompt for req in requests],
                       [req.subject_end for req in requests])


def check_request_tokens(tokenizer, request: EditRequest) -> None:
    """Raise ValueError when `request` cannot be edited with this tokenizer: its target
    tokenises to nothing after the prompt, or no token ends inside its subject."""
    texts = (("edit prompt + target", lambda: rewrite_batch(tokenizer, [request], ["{}"])),
             ("bare prompt", lambda: prompt_batch(tokenizer, [request])),
             ("KL prompt", lambda: kl_batch(tokenizer, [request])))
    for name, make in texts:
        try:
            make()
        except ValueError as err:
            raise ValueError(f"target_new {request.target_new!r} / subject {request.subject!r} "
                             f"cannot be marked up in the {name} with this tokenizer: "
                             f"{err}") from None
