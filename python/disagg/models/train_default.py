"""Train the embedded default models: a small Mixtral MoE target and a dense Llama draft.

Usage (no compiled extension needed when run as a plain script)::

    python python/disagg/models/train_default.py --out OUT_DIR [--steps N] [--draft-steps N] [--seed S]
    python -m disagg.models.train_default --out OUT_DIR          # once the package imports

Writes ``OUT_DIR/default`` (MixtralForCausalLM) and ``OUT_DIR/default-draft``
(LlamaForCausalLM), both HF-format folders that share one byte-level BPE tokenizer.

Data recipe
-----------
The corpus is the ``.py`` source of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``), because it is real, public, permissively licensed text
that every machine with Python already has -- no download. Selection is deterministic:

* every ``*.py`` file under the stdlib directory, sorted by its path relative to that directory;
* skipped: ``site-packages``/``dist-packages`` (third-party code, differs per machine) and test
  suites (directories named ``test``, ``tests``, ``idle_test``: large, full of odd fixtures);
* files that are not valid UTF-8 are skipped;
* validation split: a file goes to validation when ``sha1(relative path) % 20 == 0`` (about 5%),
  so the split does not shift when a file is added or removed elsewhere.

The recipe hash (sha256 over every selected file's relative path and content) and the file
count go into ``training_info.json``; a different Python version gives a different corpus and a
different hash, and the models trained on it differ accordingly.

Training: documents are joined with ``<|endoftext|>``; each step samples windows of
``seq_len + 1`` tokens at random offsets of the training stream from a seeded generator.
Validation loss is measured on the first ``--val-seqs`` contiguous windows of the validation
stream, identical for both models, so the draft/target agreement is measured on the same text.
Both models start from a bigram initialization of their embedding and LM head (see
``bigram_init``) because the training budget is a few hundred thousand tokens.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

# The tokenizer trainer is multi-threaded (rayon); keep it within the same two cores as torch.
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import torch  # noqa: E402

EOT = "<|endoftext|>"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}

# A completion-style chat template: the model was never trained on conversations, so a chat
# request is turned into plain text (the message contents, one per line) to be continued.
# The newline is an expression because chat templates render with trim_blocks, which would
# drop a literal newline that follows a block tag.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}"
)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def collect_corpus(root: str | None = None, val_mod: int = 20):
    """Returns (train_texts, val_texts, info) for the stdlib recipe described above."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    rels = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]):
            continue
        rels.append(rel.as_posix())
    rels.sort()
    digest = hashlib.sha256()
    train, val = [], []
    n_val_files = 0
    n_bytes = 0
    for rel in rels:
        raw = (root / rel).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        digest.update(rel.encode() + b"\0" + hashlib.sha256(raw).digest())
        n_bytes += len(raw)
        if int(hashlib.sha1(rel.encode()).hexdigest(), 16) % val_mod == 0:
            val.append(text)
            n_val_files += 1
        else:
            train.append(text)
    info = {
        "source": "Python standard library .py files (sysconfig stdlib path)",
        "python_version": platform.python_version(),
        "files": len(train) + len(val),
        "train_files": len(train),
        "val_files": n_val_files,
        "bytes": n_bytes,
        "recipe_sha256": digest.hexdigest(),
        "skipped_dirs": sorted(SKIP_DIRS),
        "val_rule": f"sha1(relative path) % {val_mod} == 0",
    }
    return train, val, info


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE: every byte is in the base alphabet, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode_stream(tok, texts) -> torch.Tensor:
    """Documents joined as EOT doc EOT doc ..., so the model learns file starts and ends."""
    eot = tok.token_to_id(EOT)
    ids = []
    for enc in tok.encode_batch(texts):
        ids.append(eot)
        ids.extend(enc.ids)
    ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


def save_tokenizer(tok, out: Path, model_max_length: int):
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        pad_token=EOT,
        unk_token=None,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    # One file every loader reads the same way: the chat template also goes into
    # tokenizer_config.json, not only a separate chat_template.jinja.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    # transformers 5 writes its own class name here; 4.x (and engines pinned to it) know only
    # PreTrainedTokenizerFast, which 5.x still maps to the same tokenizers-backed class.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def target_config(vocab: int, eot: int, seq_len: int):
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=512,  # per expert
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,  # GQA, so the engine's grouped attention path is exercised
        head_dim=32,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        router_aux_loss_coef=0.02,  # stronger than Mixtral's 0.001: few steps, want balance early
        router_jitter_noise=0.0,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )


def draft_config(vocab: int, eot: int, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=160,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=5,
        num_key_value_heads=5,
        head_dim=32,
        max_position_embeddings=seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )


@torch.no_grad()
def bigram_init(model, train_ids: torch.Tensor, vocab: int, smoothing: float = 0.1):
    """Starts the embedding and LM head from a low-rank factorization of log P(next | token).

    With a few hundred thousand tokens of training a transformer from random weights barely gets
    past the unigram distribution; counting bigrams costs a second. The centred log-bigram
    matrix L (rows: current token) is factored by SVD as U S V^T, truncated to the hidden size;
    embedding = U S^1/2 and lm_head = V S^1/2 reproduce L through the residual stream, up to the
    final RMSNorm's per-token scale, which the lm_head is rescaled for on average.
    """
    counts = torch.bincount(train_ids[:-1] * vocab + train_ids[1:], minlength=vocab * vocab)
    logp = (counts.view(vocab, vocab).double() + smoothing).log()
    logp = logp - logp.logsumexp(dim=1, keepdim=True)
    logp = logp - logp.mean(dim=1, keepdim=True)  # softmax ignores a per-row constant
    u, s, vt = torch.linalg.svd(logp)
    r = model.config.hidden_size
    root = s[:r].sqrt()
    emb = u[:, :r] * root
    head = vt[:r].T * root
    rms = emb.pow(2).mean(dim=1).sqrt()
    head = head * rms.mean()
    model.get_input_embeddings().weight.copy_(emb.float())
    model.get_output_embeddings().weight.copy_(head.float())


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine down to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def val_windows(val_ids: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    n = min(n, (len(val_ids) - 1) // (seq_len + 1))
    return val_ids[: n * (seq_len + 1)].view(n, seq_len + 1)


def train_model(name, model, train_ids, val_x, *, steps, batch, seq_len, lr, seed, moe, log_every):
    g = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = max(1, steps // 20)
    tokens_per_step = batch * seq_len
    model.train()
    t0 = time.time()
    losses = []
    extra = {"output_router_logits": True} if moe else {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        starts = torch.randint(0, len(train_ids) - seq_len - 1, (batch,), generator=g)
        x = torch.stack([train_ids[s : s + seq_len + 1] for s in starts.tolist()])
        out = model(input_ids=x[:, :-1], **extra)
        # The loss is computed here rather than through `labels=` so the windows need no
        # second shift and the language-model part can be logged apart from the router term.
        lm_loss = torch.nn.functional.cross_entropy(
            out.logits.float().reshape(-1, out.logits.size(-1)), x[:, 1:].reshape(-1)
        )
        aux_loss = per_layer_balance_loss(out.router_logits, model.config) if moe else None
        loss = lm_loss + model.config.router_aux_loss_coef * aux_loss if moe else lm_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(lm_loss.item())
        if (step + 1) % log_every == 0 or step == 0 or step + 1 == steps:
            dt = time.time() - t0
            tps = tokens_per_step * (step + 1) / dt
            eta = dt / (step + 1) * (steps - step - 1)
            aux = f" aux {aux_loss.item():.3f}" if moe else ""
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(
                f"[{name}] step {step + 1}/{steps} loss {recent:.4f}{aux} "
                f"lr {opt.param_groups[0]['lr']:.2e} {tps:.0f} tok/s ETA {eta / 60:.1f} min",
                flush=True,
            )
    train_time = time.time() - t0
    final_train = sum(losses[-max(1, steps // 10):]) / len(losses[-max(1, steps // 10):])
    return {"steps": steps, "tokens_seen": steps * tokens_per_step, "batch": batch,
            "seq_len": seq_len, "peak_lr": lr, "warmup_steps": warmup,
            "train_time_s": round(train_time, 1), "final_train_loss": round(final_train, 4)}


def per_layer_balance_loss(router_logits, config) -> torch.Tensor:
    """Switch-style load-balancing loss computed per layer and averaged over layers.

    ``transformers``' Mixtral ``aux_loss`` concatenates the router logits of all layers before
    computing the balance term, so it only asks the experts to be balanced *summed over layers*:
    a run can send every layer's tokens to the same two experts of that layer (max/mean load
    4.0 in each) while the pooled term sits at its balanced value. Here each layer is balanced
    on its own: ``E * sum_e f_e * P_e`` with ``f_e`` the share of the top-k assignments that go
    to expert ``e`` and ``P_e`` its mean router probability (1.0 when perfectly even)."""
    k, E = config.num_experts_per_tok, config.num_local_experts
    total = 0.0
    for rl in router_logits:
        probs = torch.softmax(rl.float(), dim=-1)                      # [N, E]
        chosen = torch.topk(probs, k, dim=-1).indices                  # [N, k]
        f = torch.zeros(E).index_add_(0, chosen.reshape(-1),
                                      torch.ones(chosen.numel())) / chosen.numel()
        total = total + E * (f * probs.mean(0)).sum()
    return total / len(router_logits)


@torch.no_grad()
def evaluate(model, val_x, moe, batch=8):
    """Mean next-token loss on the validation windows, plus (for MoE) expert load per layer."""
    model.eval()
    total, count = 0.0, 0
    argmax = []
    load = None
    for i in range(0, len(val_x), batch):
        x = val_x[i : i + batch]
        out = model(input_ids=x[:, :-1], output_router_logits=moe) if moe else model(input_ids=x[:, :-1])
        logits = out.logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += x[:, 1:].numel()
        argmax.append(logits.argmax(-1))
        if moe:
            k = model.config.num_experts_per_tok
            e = model.config.num_local_experts
            layer_counts = torch.stack([
                torch.bincount(rl.topk(k, dim=-1).indices.reshape(-1), minlength=e)
                for rl in out.router_logits
            ])
            load = layer_counts if load is None else load + layer_counts
    model.train()
    val_loss = total / count
    res = {"val_loss": round(val_loss, 4), "val_ppl": round(math.exp(val_loss), 3), "val_tokens": count}
    if moe:
        frac = load.double() / load.sum(dim=1, keepdim=True)
        res["expert_load"] = [[round(v, 4) for v in row] for row in frac.tolist()]
        # max/mean of the per-expert share: 1.0 is perfectly even, 4.0 means two experts take all.
        res["expert_load_max_over_mean"] = [round(v, 3) for v in (frac.max(1).values * frac.size(1)).tolist()]
    return res, torch.cat(argmax)


def save_model(model, out: Path, dtype, tok, seq_len, info):
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to(dtype).save_pretrained(str(out))
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    # Loaders written against transformers 4.x read the top-level rope_theta.
    cfg["rope_theta"] = cfg.get("rope_parameters", {}).get("rope_theta", 10000.0)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    eot = tok.token_to_id(EOT)
    GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot).save_pretrained(str(out))
    save_tokenizer(tok, out, seq_len)
    (out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="writes OUT/default and OUT/default-draft")
    p.add_argument("--steps", type=int, default=1200, help="target optimizer steps")
    p.add_argument("--draft-steps", type=int, default=2000, help="draft optimizer steps")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--draft-lr", type=float, default=1e-3)
    p.add_argument("--val-seqs", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=4)
    p.add_argument("--stdlib", default=None, help="corpus root (default: this interpreter's stdlib)")
    args = p.parse_args(argv)

    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t_start = time.time()
    out = Path(args.out)

    train_texts, val_texts, data_info = collect_corpus(args.stdlib)
    print(f"corpus: {data_info['files']} files ({data_info['val_files']} val), "
          f"{data_info['bytes'] / 1e6:.1f} MB, sha256 {data_info['recipe_sha256'][:16]}", flush=True)
    t = time.time()
    tok = train_tokenizer(train_texts, args.vocab)
    train_ids = encode_stream(tok, train_texts)
    val_ids = encode_stream(tok, val_texts)
    vocab = tok.get_vocab_size()
    eot = tok.token_to_id(EOT)
    print(f"tokenizer: vocab {vocab}, {len(train_ids)} train / {len(val_ids)} val tokens "
          f"({data_info['bytes'] / (len(train_ids) + len(val_ids)):.2f} bytes/token), "
          f"{time.time() - t:.0f}s", flush=True)
    data_info.update(train_tokens=len(train_ids), val_tokens_total=len(val_ids), vocab_size=vocab)
    val_x = val_windows(val_ids, args.seq_len, args.val_seqs)

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch_threads": args.threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }

    # Target first: the draft's agreement with it is measured at the end.
    torch.manual_seed(args.seed)
    from transformers import LlamaForCausalLM, MixtralForCausalLM

    target = MixtralForCausalLM(target_config(vocab, eot, args.seq_len))
    bigram_init(target, train_ids, vocab)
    n_target = sum(p.numel() for p in target.parameters())
    print(f"target: MixtralForCausalLM {n_target / 1e6:.2f}M params", flush=True)
    t_info = train_model("target", target, train_ids, val_x, steps=args.steps, batch=args.batch,
                         seq_len=args.seq_len, lr=args.lr, seed=args.seed, moe=True,
                         log_every=args.log_every)
    t_eval, t_argmax = evaluate(target, val_x, moe=True)
    print(f"target val loss {t_eval['val_loss']} ppl {t_eval['val_ppl']}; expert load max/mean "
          f"per layer {t_eval['expert_load_max_over_mean']}", flush=True)

    torch.manual_seed(args.seed + 1)
    draft = LlamaForCausalLM(draft_config(vocab, eot, args.seq_len))
    bigram_init(draft, train_ids, vocab)
    n_draft = sum(p.numel() for p in draft.parameters())
    print(f"draft: LlamaForCausalLM {n_draft / 1e6:.2f}M params", flush=True)
    d_info = train_model("draft", draft, train_ids, val_x, steps=args.draft_steps, batch=args.batch,
                         seq_len=args.seq_len, lr=args.draft_lr, seed=args.seed + 1, moe=False,
                         log_every=args.log_every)
    d_eval, d_argmax = evaluate(draft, val_x, moe=False)
    agree = (d_argmax == t_argmax).double().mean().item()
    print(f"draft val loss {d_eval['val_loss']} ppl {d_eval['val_ppl']}; greedy agreement with "
          f"target {agree:.3f}", flush=True)

    common = {"data": data_info, "machine": machine, "seed": args.seed,
              "total_wall_time_s": round(time.time() - t_start, 1),
              "command": "python python/disagg/models/train_default.py --out OUT "
                         f"--steps {args.steps} --draft-steps {args.draft_steps} --seed {args.seed}"}
    # bf16 keeps the target's checkpoint small; every bf16 value is exact in fp32, so engines
    # that compare against transformers in fp32 load the very same weights.
    save_model(target, out / "default", torch.bfloat16, tok, args.seq_len, {
        "model": "MixtralForCausalLM", "params": n_target, "saved_dtype": "bfloat16",
        **t_info, **t_eval, **common})
    save_model(draft, out / "default-draft", torch.float32, tok, args.seq_len, {
        "model": "LlamaForCausalLM", "params": n_draft, "saved_dtype": "float32",
        **d_info, **d_eval, "greedy_agreement_with_target": round(agree, 4), **common})
    print(f"wrote {out / 'default'} and {out / 'default-draft'} in "
          f"{(time.time() - t_start) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
