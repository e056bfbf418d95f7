"""Answer decoding for MISS: beam search (greedy when ``num_beams == 1``) and closed-list ranking.

The JTM states of a sample are computed once; the decoder's cross-attention keys/values are
projected once per sample and shared by its beams (grouped cross-attention), so beams cost only the
decoder's own tokens. The decoder re-reads its (at most ``max_new_tokens``-long) prefix each step
instead of keeping a self-attention cache: answers are a few tokens long. Both paths are
deterministic (no sampling; ties resolved by ``topk``'s stable order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def beam_search(model, states: torch.Tensor, mask: torch.Tensor, *, num_beams: int = 3, max_new_tokens: int = 10,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Token ids (after ``[DEC]``, up to and excluding ``[SEP]``) of the best beam per sample.

    ``states`` (B, T, C) / ``mask`` (B, T) are the JTM outputs. Finished beams (that produced
    ``[SEP]``) are frozen with their score; the final choice divides each beam's log-probability by
    its length ** ``length_penalty`` (HF generate's default, which BLIP uses).
    """
    tok = model.tokenizer
    decoder = model.text_decoder
    batch, device = states.shape[0], states.device
    cross_kv = decoder.bert.cross_kv(states)
    seqs = torch.full((batch * num_beams, 1), tok.dec_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch, num_beams, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first at step one
    finished = torch.zeros(batch * num_beams, dtype=torch.bool, device=device)
    lengths = torch.zeros(batch * num_beams, device=device)
    offsets = (torch.arange(batch, device=device) * num_beams)[:, None]
    for _ in range(max_new_tokens):
        logits = decoder(seqs, None, states, mask, cross_kv=cross_kv, group=num_beams)[:, -1]
        logp = F.log_softmax(logits.float(), dim=-1)  # (B*nb, V)
        vocab = logp.shape[-1]
        logp[finished] = float("-inf")
        logp[finished, tok.pad_id] = 0.0  # a finished beam continues with padding at no cost
        cand = (scores[:, :, None] + logp.view(batch, num_beams, vocab)).view(batch, -1)
        scores, index = cand.topk(num_beams, dim=-1)  # (B, nb)
        rows = (offsets + torch.div(index, vocab, rounding_mode="floor")).view(-1)
        new = (index % vocab).view(-1)
        lengths = lengths[rows] + (~finished[rows]).float()
        finished = finished[rows] | (new == tok.sep_id)
        seqs = torch.cat([seqs[rows], new[:, None]], dim=1)
        if bool(finished.all()):
            break
    normalised = scores / lengths.view(batch, num_beams).clamp(min=1) ** length_penalty
    best = (offsets[:, 0] + normalised.argmax(dim=-1)).tolist()
    out = []
    for row in best:
        ids = seqs[row, 1:].tolist()
        out.append(ids[: ids.index(tok.sep_id)] if tok.sep_id in ids else ids)
    return out


@torch.no_grad()
def rank(model, states: torch.Tensor, mask: torch.Tensor, candidates: list[str], chunk: int = 64) -> list[int]:
    """Index of the candidate with the highest total log-probability (``[DEC] answer [SEP]``) per sample."""
    tok = model.tokenizer
    decoder = model.text_decoder
    ids, _, _ = tok.encode(candidates, model.config.max_answer_tokens, first=tok.dec_id)
    ids = ids.to(states.device)
    batch = states.shape[0]
    cross_kv = decoder.bert.cross_kv(states)
    totals = []
    for start in range(0, len(candidates), chunk):
        part = ids[start : start + chunk]  # (C, L)
        c = part.shape[0]
        inputs = part.repeat(batch, 1)  # (B*C, L): row b*C + j is candidate j of sample b
        logits = decoder(inputs[:, :-1], inputs[:, :-1] != tok.pad_id, states, mask, cross_kv=cross_kv, group=c)
        logp = F.log_softmax(logits.float(), dim=-1)
        target = inputs[:, 1:]
        picked = logp.gather(-1, target[..., None])[..., 0].masked_fill(target == tok.pad_id, 0.0)
        totals.append(picked.sum(-1).view(batch, c))
    return torch.cat(totals, dim=1).argmax(dim=1).tolist()
