"""Stage 2: the Q-Former's query outputs become a soft visual prompt for a FROZEN language model.

    frozen image tokens (B, N, Dv) -> ln_vision -> Q-Former queries (B, Q, H) -> llm_proj -> (B, Q, D)
    decoder-only LLM (OPT, Llama, SmolLM2):
        [queries | BOS? | prompt | caption | EOS | pad...]   loss on caption + EOS only
    encoder-decoder LLM (T5, FlanT5), prefix LM:
        encoder [queries | prompt + caption prefix | EOS | pad...]   decoder target: caption suffix + EOS

Only ln_vision, the Q-Former's query path and llm_proj train (~107M at paper scale); gradients flow
THROUGH the frozen LLM into them. Like stage 1, the model takes image TOKENS (the frozen image encoder
runs outside it, so its features can be cached). Shapes: B batch, Q queries, T text tokens, D LLM width.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import freeze
from .config import QFormerConfig
from .qformer import QFormer


def vqa_prompt(question: str, style: str = "opt") -> str:
    """The paper's zero-shot VQA prompts: "Question: {} Answer:" (OPT) / "Question: {} Short answer:" (FlanT5)."""
    if style not in ("opt", "t5"):
        raise ValueError(f"style must be 'opt' or 't5', not {style!r}")
    return f"Question: {question.strip()} {'Answer:' if style == 'opt' else 'Short answer:'}"


class FrozenLLMCaptioner(nn.Module):
    """Everything on the LLM's side of stage 2: a soft prompt (B, Q, D) from `visual_prompt` goes in front of the
    text, the frozen LLM learns nothing and passes gradients through. Stage2Model (below) makes the prompt with
    the Q-Former; tools/baselines.py's LinearProjectionModel with one linear layer."""

    def __init__(self, llm: nn.Module, tokenizer, prompt: str = "a photo of", max_text_len: int = 32,
                 add_bos: bool | None = None):
        """llm: a transformers causal LM or seq2seq LM (frozen here); tokenizer: its tokenizer (needs an EOS).

        add_bos (decoder-only LLMs): put the tokenizer's BOS between the queries and the text. None = do what
        the tokenizer does by itself: OPT's and Llama-2's add one (`</s>` / `<s>`; LAVIS blip2_opt and HF's
        Blip2Processor keep it, after the queries), SmolLM2's adds none, so neither do we.
        """
        super().__init__()
        self.tokenizer, self.max_text_len, self.prompt = tokenizer, max_text_len, prompt
        self.llm = freeze(llm)
        self.is_encoder_decoder = bool(llm.config.is_encoder_decoder)
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: captions need an end token (set tokenizer.eos_token)")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if add_bos is None:
            bos, ids = tokenizer.bos_token_id, tokenizer("a", add_special_tokens=True)["input_ids"]
            add_bos = bos is not None and len(ids) > 0 and ids[0] == bos
        self.bos = [tokenizer.bos_token_id] if add_bos and not self.is_encoder_decoder else []
        self._line_break_ids = None  # generate(): the tokens that end a line (line_break_ids)

    def visual_prompt(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Frozen image tokens (B, N, Dv) -> soft visual prompt (B, Q, D) in the LLM's dtype."""
        raise NotImplementedError

    # ------------------------------------------------------------------ weights

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen LLM (what a checkpoint needs; the LLM reloads from its own files)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.")}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]):
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("llm.")]
        if missing or unexpected:
            raise KeyError(f"stage-2 checkpoint mismatch: missing {missing}, unexpected {unexpected}")

    # ------------------------------------------------------------------ inputs

    def llm_inputs(self, image_embeds, input_ids, attention_mask) -> dict[str, torch.Tensor]:
        """[visual prompt | embedded tokens]: inputs_embeds (B, Q+T, D) and attention_mask (B, Q+T).
        The queries always attend (mask 1); input_ids (B, T) are right-padded."""
        queries = self.visual_prompt(image_embeds)
        text = self.llm.get_input_embeddings()(input_ids)
        ones = torch.ones(queries.shape[:2], dtype=attention_mask.dtype, device=attention_mask.device)
        return {"inputs_embeds": torch.cat([queries, text], dim=1), "attention_mask": torch.cat([ones, attention_mask], 1)}

    def _prompts(self, prompt, batch_size: int) -> list[str]:
        prompt = self.prompt if prompt is None else prompt
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch_size:
            raise ValueError(f"{len(prompts)} prompts for {batch_size} images")
        return [p.rstrip() for p in prompts]  # "a photo of " + " a dog": BPE tokenizers want the space on the word

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # special tokens added by hand

    def _pad(self, seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
        """Lists of ids -> (B, T) tensor, padded on the right (or left). T may be 0: an empty prompt with no BOS
        leaves no text at all in front of the generated tokens (the queries alone)."""
        T = max(len(s) for s in seqs)
        rows = [[value] * (T - len(s)) + s if left else s + [value] * (T - len(s)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long, device=self.llm.get_input_embeddings().weight.device)

    def caption_batch(self, captions: list[str], prompt=None):
        """Decoder-only: token ids / attention mask / labels (B, T) for [BOS? | prompt | caption | EOS | pad].

        Labels are -100 on BOS, prompt and padding, so only the caption and its EOS are learned. Masks come from
        lengths, not from `ids == pad`: SmolLM2's pad IS its EOS, and the EOS must keep its label.
        """
        prompts = self._prompts(prompt, len(captions))
        p_ids = self._tokenize(prompts)
        # prompt and caption tokenised TOGETHER (as LAVIS does), then the prompt's own length is masked: splitting
        # the text is safe for BPE and SentencePiece alike, as long as the prompt ends at a word boundary
        full = self._tokenize([f"{p} {c.strip()}".strip() for p, c in zip(prompts, captions)])
        ids, labels = [], []
        for p, f in zip(p_ids, full):
            head = self.bos + f[: len(p)]
            tail = f[len(p):][: self.max_text_len - 1] + [self.eos_id]  # the EOS always survives truncation
            ids.append(head + tail)
            labels.append([-100] * len(head) + tail)
        mask = self._pad([[1] * len(s) for s in ids], 0)
        return self._pad(ids, self.pad_id), mask, self._pad(labels, -100)

    def prefix_lm_batch(self, captions: list[str], prompt=None, generator: torch.Generator | None = None):
        """Encoder-decoder: split each caption at a random word (>= 1 word in the suffix, the prefix may be
        empty = plain captioning). Returns encoder ids/mask (prompt + prefix + EOS) and decoder labels/mask
        (suffix + EOS), all right-padded (B, T).

        The paper's prefix LM for FlanT5. LAVIS never implemented this split for pretraining (its blip2_t5
        stage-2 pretraining expects a "text_output" the caption datasets do not have).
        """
        prompts = self._prompts(prompt, len(captions))
        enc_texts, dec_texts = [], []
        for p, c in zip(prompts, captions):
            words = c.split()
            k = int(torch.randint(0, len(words), (1,), generator=generator)) if words else 0
            enc_texts.append(" ".join([p] + words[:k]).strip())
            dec_texts.append(" ".join(words[k:]))
        n = self.max_text_len - 1
        enc = [s[:n] + [self.eos_id] for s in self._tokenize(enc_texts)]
        dec = [s[:n] + [self.eos_id] for s in self._tokenize(dec_texts)]
        enc_mask = self._pad([[1] * len(s) for s in enc], 0)
        dec_mask = self._pad([[1] * len(s) for s in dec], 0)
        return self._pad(enc, self.pad_id), enc_mask, self._pad(dec, -100), dec_mask

    # ------------------------------------------------------------------ training

    def forward(self, image_embeds, captions: list[str], prompt=None, generator: torch.Generator | None = None):
        """image_embeds (B, N, Dv) frozen image tokens; captions: B strings. -> dict(loss, loss_lm detached).

        generator seeds the T5 prefix/suffix split. The loss is the mean cross-entropy over target tokens,
        computed in fp32 whatever the LLM's dtype.
        """
        if self.is_encoder_decoder:
            ids, mask, labels, dec_mask = self.prefix_lm_batch(captions, prompt, generator)
            out = self.llm(**self.llm_inputs(image_embeds, ids, mask), decoder_attention_mask=dec_mask,
                           decoder_input_ids=self.llm.prepare_decoder_input_ids_from_labels(labels=labels))
            logits = out.logits  # (B, T_dec, V): position t predicts labels[:, t]
        else:
            ids, mask, labels = self.caption_batch(captions, prompt)
            inputs = self.llm_inputs(image_embeds, ids, mask)
            Q = inputs["inputs_embeds"].shape[1] - ids.shape[1]  # the soft prompt's length
            labels = torch.cat([labels.new_full((labels.shape[0], Q), -100), labels], dim=1)  # (B, Q+T)
            # right padding: real tokens sit at positions 0..len-1, exactly as without padding
            logits = self.llm(**inputs).logits[:, :-1]  # position t predicts t+1
            labels = labels[:, 1:]
        keep = labels != -100
        loss = F.cross_entropy(logits[keep].float(), labels[keep])  # only the target rows, in fp32
        return {"loss": loss, "loss_lm": loss.detach()}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate(self, image_embeds, prompt=None, num_beams: int = 5, max_new_tokens: int = 30,
                 min_new_tokens: int = 1, repetition_penalty: float = 1.0, length_penalty: float = 1.0,
                 no_repeat_ngram_size: int = 0) -> list[str]:
        """Image tokens (B, N, Dv) -> B strings. prompt: None (the model's), one str for all, or one per image
        (instructions, `vqa_prompt(...)` questions). num_beams=1 is greedy. Uses the LLM's own generate().

        A caption or an answer is one line: the text ends at EOS or at the first line break (a chat LLM such
        as SmolLM2-Instruct ends a sentence with "\n\n" far more often than with its end-of-turn EOS).
        no_repeat_ngram_size > 0 forbids repeating any n-gram (a weakly trained prompt otherwise loops).
        """
        B = image_embeds.shape[0]
        prompts = self._prompts(prompt, B)
        queries = self.visual_prompt(image_embeds)  # (B, Q, D)
        embed = self.llm.get_input_embeddings()
        if self.is_encoder_decoder:  # encoder [queries | prompt EOS | pad]: right padding is fine for an encoder
            ids = [s[: self.max_text_len - 1] + [self.eos_id] for s in self._tokenize(prompts)]
            mask = self._pad([[1] * len(s) for s in ids], 0)
            ones = mask.new_ones(B, queries.shape[1])
            inputs = torch.cat([queries, embed(self._pad(ids, self.pad_id))], 1)
            mask = torch.cat([ones, mask], 1)
        else:  # decoder-only: LEFT padding [pad | queries | BOS? prompt], so every row ends where generation starts
            ids = [self.bos + s for s in self._tokenize(prompts)]
            lens = [len(s) for s in ids]
            text = embed(self._pad(ids, self.pad_id, left=True))  # (B, P, D)
            P, Q = text.shape[1], queries.shape[1]
            inputs = torch.stack([torch.cat([text[b, : P - n], queries[b], text[b, P - n:]]) for b, n in enumerate(lens)])
            mask = self._pad([[1] * (Q + n) for n in lens], 0, left=True)  # (B, Q+P)
            # generate() derives position ids from the mask (cumsum), so the padding does not shift positions
        # a line break ends the text like EOS, inside beam search too (LAVIS's OPT generates with "\n" as its EOS):
        # a beam is scored up to its first line break, not on what it would say after it and we cut off
        kw = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                  eos_token_id=[self.eos_id] + self.line_break_ids(), pad_token_id=self.pad_id)
        if num_beams > 1:
            kw["length_penalty"] = length_penalty
        if repetition_penalty != 1.0:
            kw["repetition_penalty"] = repetition_penalty
        if no_repeat_ngram_size > 0:
            kw["no_repeat_ngram_size"] = no_repeat_ngram_size
        with warnings.catch_warnings():  # "repetition penalty only on new tokens": true, the prompt is soft anyway
            warnings.simplefilter("ignore", UserWarning)
            out = self.llm.generate(inputs_embeds=inputs, attention_mask=mask, **kw)
        # decoder-only generate() from inputs_embeds returns only the new tokens; T5 starts with its decoder start
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True)
        return [t.strip().split("\n")[0].strip() for t in texts]


    def line_break_ids(self) -> list[int]:
        """Every token whose text holds a line break ("\n" in OPT's and SmolLM2's BPE, also "\n\n", ".\n", ...):
        the text ends there. Found once by decoding the vocabulary (~50k tokens: well under a second)."""
        if self._line_break_ids is None:
            texts = self.tokenizer.batch_decode([[i] for i in range(len(self.tokenizer))])
            self._line_break_ids = [i for i, t in enumerate(texts) if "\n" in t and i != self.eos_id]
        return self._line_break_ids


class Stage2Model(FrozenLLMCaptioner):
    """BLIP-2's stage 2: frozen image tokens -> ln_vision -> Q-Former queries (B, Q, H) -> llm_proj -> (B, Q, D)."""

    def __init__(self, qcfg: QFormerConfig, llm: nn.Module, tokenizer, prompt: str = "a photo of",
                 max_text_len: int = 32, add_bos: bool | None = None):
        super().__init__(llm, tokenizer, prompt, max_text_len, add_bos)
        self.qcfg = qcfg
        self.ln_vision = nn.LayerNorm(qcfg.vision_width)
        self.qformer = QFormer(qcfg, with_text=False)
        width = llm.get_input_embeddings().embedding_dim  # = hidden_size / d_model (OPT-350m: word_embed_proj_dim)
        self.llm_proj = nn.Linear(qcfg.hidden_size, width)

    @torch.no_grad()
    def from_stage1(self, stage1_state: dict[str, torch.Tensor]) -> "Stage2Model":
        """Copy ln_vision and the Q-Former's query path from a Stage1Model state dict; the text parts (word/position
        embeddings, text FFNs, lm_head, projections, itm_head, temp) are dropped. Not calling this = the
        "no stage 1" ablation (a freshly initialised Q-Former)."""
        own = self.state_dict()
        for k in own:
            if k.startswith(("ln_vision.", "qformer.")):
                if k not in stage1_state:
                    raise KeyError(f"stage-1 state dict has no {k!r}: do the QFormerConfigs match?")
                own[k].copy_(stage1_state[k])
        # what stage 1 trained; build_optimizer scales their lr by Stage2Config.pretrained_lr_scale
        self.pretrained_names = {n for n, _ in self.named_parameters() if n.startswith(("ln_vision.", "qformer."))}
        return self

    def visual_prompt(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Frozen image tokens (B, N, Dv) -> soft visual prompt (B, Q, D) in the LLM's dtype.

        The Q-Former stays fp32 (fp16 training of it diverges); only its output is cast for a fp16/bf16 LLM.
        """
        img = self.ln_vision(image_embeds.to(self.ln_vision.weight.dtype))
        return self.llm_proj(self.qformer(img)).to(self.llm.get_input_embeddings().weight.dtype)
