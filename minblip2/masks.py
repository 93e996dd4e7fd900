"""The three self-attention masks of the Q-Former, one per stage-1 objective.

The Q-Former's self-attention runs over one sequence: Q learned queries followed by T text tokens.
A mask is a (Q+T, Q+T) boolean matrix: row i may attend to column j where it is True.

    unimodal (ITC)            bidirectional (ITM)        multimodal causal (ITG)
    queries | text            queries | text             queries | text
    Q  [ 1 1 | 0 0 0 ]        Q  [ 1 1 | 1 1 1 ]         Q  [ 1 1 | 0 0 0 ]
    Q  [ 1 1 | 0 0 0 ]        Q  [ 1 1 | 1 1 1 ]         Q  [ 1 1 | 0 0 0 ]
    T  [ 0 0 | 1 1 1 ]        T  [ 1 1 | 1 1 1 ]         T  [ 1 1 | 1 0 0 ]
    T  [ 0 0 | 1 1 1 ]        T  [ 1 1 | 1 1 1 ]         T  [ 1 1 | 1 1 0 ]
    T  [ 0 0 | 1 1 1 ]        T  [ 1 1 | 1 1 1 ]         T  [ 1 1 | 1 1 1 ]

- ITC compares an image embedding with a text embedding: neither may peek at the other.
- ITM classifies a (image, text) pair as matching: everything sees everything.
- ITG generates text from the image: text sees all queries and only earlier text; the queries never
  see the text (else the answer would leak into the image representation).
"""
import torch


def unimodal_mask(num_queries: int, num_text: int, device=None) -> torch.Tensor:
    """ITC: queries see queries, text sees text. (Q+T, Q+T) bool."""
    L = num_queries + num_text
    m = torch.zeros(L, L, dtype=torch.bool, device=device)
    m[:num_queries, :num_queries] = True
    m[num_queries:, num_queries:] = True
    return m


def bidirectional_mask(num_queries: int, num_text: int, device=None) -> torch.Tensor:
    """ITM: every token sees every token. (Q+T, Q+T) bool."""
    L = num_queries + num_text
    return torch.ones(L, L, dtype=torch.bool, device=device)


def multimodal_causal_mask(num_queries: int, num_text: int, device=None) -> torch.Tensor:
    """ITG: queries see queries; text token i sees all queries and text tokens 0..i. (Q+T, Q+T) bool."""
    L = num_queries + num_text
    m = torch.zeros(L, L, dtype=torch.bool, device=device)
    m[:num_queries, :num_queries] = True
    m[num_queries:, :num_queries] = True
    m[num_queries:, num_queries:] = torch.ones(num_text, num_text, dtype=torch.bool, device=device).tril()
    return m


def with_padding(mask: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
    """Combine a (L, L) objective mask with a (B, L) "token is real" mask -> (B, L, L).

    Padding removes KEYS (columns): no token may attend to a pad. Pad rows keep their (harmless)
    attention to real tokens, so no row is ever all-False (which would give NaN in softmax).
    """
    return mask.unsqueeze(0) & key_padding.bool().unsqueeze(1)


def mean_over_tokens(h, text_mask):
    """(B, T, H) outputs -> (B, H): the mean over real tokens (text_mask 1), as sentence-transformers pools
    (the padding mask again: pads must not count)."""
    m = text_mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1)
