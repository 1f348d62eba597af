"""Train a small decoder-only character language model whose attention is any attndsl spec.

    python examples/train_char_lm.py --spec examples/alibi.attn --steps 200
    python examples/train_char_lm.py --compare            # the table and curves of the docs

The text is the project's own documentation (docs/language.md and README.md), so nothing is
downloaded. The model is two pre-norm transformer blocks. Each block projects q, k and v,
attends with `attndsl.torch.Attention(spec)` (the module owns the spec's params), and adds an
MLP. After training it generates text with a KV cache: each new token is one query row at
`q_offset = position` against the cached keys.

`--compare` trains causal, ALiBi, softcap, sigmoid and sliding-window-with-sink specs for the
same steps from the same seed. It also trains the causal spec against
torch.nn.functional.scaled_dot_product_attention in float64. It writes
benchmarks/results/train_char_lm.md and train_char_lm.png.
"""

from __future__ import annotations

import argparse
import math
import platform
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import attndsl
import attndsl.torch as at
from attndsl.progress import progress, progress_done

ROOT = Path(__file__).resolve().parent.parent
TEXT_FILES = ("docs/language.md", "README.md")
COMPARED = ("causal", "alibi", "softcap", "sigmoid_causal", "sliding_window_sink")
# sigmoid.attn has no mask; a language model needs one, so this one adds it
SIGMOID_CAUSAL = """attention sigmoid_causal {
    score     q . k
    scale     1 / sqrt(d)
    mask      j <= i
    normalize sigmoid(s - log(n_k))
}"""


def load_spec(name_or_path: str) -> attndsl.ir.Spec:
    if name_or_path == "sigmoid_causal":
        return attndsl.parse(SIGMOID_CAUSAL)
    path = Path(name_or_path)
    if not path.exists():
        path = ROOT / "examples" / f"{name_or_path}.attn"
    return attndsl.load(path)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, kv_heads: int, attention: nn.Module | None):
        super().__init__()
        self.heads, self.kv_heads, self.dh = heads, kv_heads, width // heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * kv_heads * self.dh, bias=False)
        self.proj = nn.Linear(width, width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.attention = attention  # None: torch's scaled_dot_product_attention, causal

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int
               ) -> torch.Tensor:
        if self.attention is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=offset == 0 and
                                                  q.shape[2] > 1,
                                                  enable_gqa=self.heads != self.kv_heads)
        return self.attention(q, k, v, q_offset=offset)

    def forward(self, x: torch.Tensor, cache: dict[str, torch.Tensor] | None = None,
                offset: int = 0) -> torch.Tensor:
        B, T, W = x.shape
        h = self.norm1(x)
        q = self.q(h).view(B, T, self.heads, self.dh).transpose(1, 2)
        k, v = self.kv(h).view(B, T, 2, self.kv_heads, self.dh).permute(2, 0, 3, 1, 4)
        if cache is not None:  # decoding: this call's keys join the cached ones
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        y = self.attend(q, k, v, offset).transpose(1, 2).reshape(B, T, W)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class CharLM(nn.Module):
    def __init__(self, vocab: int, spec: attndsl.ir.Spec | None, width: int = 64,
                 layers: int = 2, context: int = 64):
        super().__init__()
        heads = (spec.heads if spec is not None else None) or 4
        kv_heads = (spec.kv_heads if spec is not None else None) or heads
        self.context = context
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            attention = None if spec is None else at.Attention(spec, heads=heads,
                                                               kv_heads=kv_heads)
            self.blocks.append(Block(width, heads, kv_heads, attention))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, caches: list[dict[str, torch.Tensor]] | None = None,
                offset: int = 0) -> torch.Tensor:
        x = self.embed(tokens)
        for n, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[n], offset)
        return self.out(self.norm(x))


def corpus() -> tuple[torch.Tensor, list[str]]:
    text = "\n".join((ROOT / name).read_text(encoding="utf-8") for name in TEXT_FILES)
    chars = sorted(set(text))
    index = {c: n for n, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def batches(data: torch.Tensor, steps: int, batch: int, context: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=generator)
        rows = torch.stack([data[s:s + context + 1] for s in starts])
        yield rows[:, :-1], rows[:, 1:]


def train(spec: attndsl.ir.Spec | None, steps: int, dtype: torch.dtype, seed: int = 0,
          batch: int = 16, context: int = 64, label: str = "training"
          ) -> tuple[CharLM, list[float], float]:
    """The model after `steps` steps, its losses and steps per second; progress on stderr
    (one line rewritten on a terminal, every 5% of the steps in a log)."""
    data, chars = corpus()
    torch.manual_seed(seed)
    model = CharLM(len(chars), spec, context=context).to(dtype)
    # the spec's params (ALiBi slopes, a sink) start at the module's documented defaults; the
    # rest of the model starts from the same seed whichever attention it uses
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    start = time.perf_counter()
    for x, y in batches(data, steps, batch, context, seed):
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if len(losses) % max(1, steps // 20) == 0 or len(losses) == steps:
            progress(f"{label}: step {len(losses)}/{steps}, loss {losses[-1]:.3f}")
    progress_done()
    return model, losses, steps / (time.perf_counter() - start)


@torch.no_grad()
def generate(model: CharLM, prompt: str, count: int, cached: bool) -> tuple[str, float]:
    """Greedy decoding; `cached`: one query row per step at q_offset = its position."""
    _, chars = corpus()
    index = {c: n for n, c in enumerate(chars)}
    tokens = [index.get(c, 0) for c in prompt]
    start = time.perf_counter()
    if cached:
        caches: list[dict[str, torch.Tensor]] = [{} for _ in model.blocks]
        logits = model(torch.tensor([tokens]), caches, 0)
        for _ in range(count):
            tokens.append(int(logits[0, -1].argmax()))
            logits = model(torch.tensor([tokens[-1:]]), caches, len(tokens) - 1)
    else:
        for _ in range(count):
            logits = model(torch.tensor([tokens]))
            tokens.append(int(logits[0, -1].argmax()))
    seconds = time.perf_counter() - start
    return "".join(chars[t] for t in tokens), count / seconds


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def compare(steps: int, out_dir: Path) -> None:
    """The table and curves: every compared spec in float32, and causal against SDPA in
    float64 (same seed, same batches)."""
    curves: dict[str, list[float]] = {}
    rates: dict[str, float] = {}
    _, ours, rates["causal f64"] = train(load_spec("causal"), steps, torch.float64,
                                         label="attndsl causal, float64")
    _, sdpa, rates["sdpa f64"] = train(None, steps, torch.float64, label="SDPA, float64")
    rel = max(abs(a - b) / abs(b) for a, b in zip(ours, sdpa))
    _, ours32, _ = train(load_spec("causal"), steps, torch.float32,
                         label="attndsl causal, float32")
    _, sdpa32, _ = train(None, steps, torch.float32, label="SDPA, float32")
    rel32 = max(abs(a - b) / abs(b) for a, b in zip(ours32, sdpa32))
    for name in COMPARED:
        model, curves[name], rates[name] = train(load_spec(name), steps, torch.float32,
                                                 label=f"{name}, float32")
        if name == "causal":
            text_plain, plain = generate(model, "The ", 64, cached=False)
            text_cached, cached = generate(model, "The ", 64, cached=True)
            same = text_plain == text_cached
    lines = [f"# Training a character LM with attndsl attention ({steps} steps)", "",
             (f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads; torch "
             f"{torch.__version__}. Script: `python examples/train_char_lm.py --compare`."), "",
             "## attndsl causal vs torch SDPA in the same model, same seed, same batches", "",
             ("| dtype | largest relative loss difference over the steps | steps/s attndsl | "
             "steps/s SDPA |"), "| --- | --- | --- | --- |",
             f"| float64 | {rel:.2e} | {rates['causal f64']:.1f} | {rates['sdpa f64']:.1f} |",
             f"| float32 | {rel32:.2e} | | |", "",
             "## Final loss per spec (float32, mean of the last 10 steps)", "",
             "| spec | final loss | steps/s |", "| --- | --- | --- |"]
    for name, curve in curves.items():
        lines.append(f"| {name} | {sum(curve[-10:]) / 10:.4f} | {rates[name]:.1f} |")
    lines += ["", "## Decoding (causal model, greedy, 64 tokens, batch 1)", "",
              f"- without a cache (the whole prefix each step): {plain:.1f} tokens/s",
              f"- with a KV cache (one row at q_offset = position): {cached:.1f} tokens/s",
              f"- same text both ways: {same}", "", "```", text_cached, "```", ""]
    (out_dir / "train_char_lm.md").write_text("\n".join(lines), encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name, curve in curves.items():
        ax.plot(curve, label=name, linewidth=1)
    ax.plot(sdpa32, label="torch SDPA (causal)", linestyle="--", linewidth=1, color="black")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per character)")
    ax.set_title(f"Character LM, 2 blocks, width 64, float32 ({cpu_model()})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "train_char_lm.png")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="causal", help="a .attn file or an example name")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--compare", action="store_true", help="write the docs' table and PNG")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.compare:
        compare(args.steps, Path(args.out))
        return
    dtype = torch.float64 if args.float64 else torch.float32
    model, losses, rate = train(load_spec(args.spec), args.steps, dtype, label=args.spec)
    print(f"{args.spec}: loss {losses[0]:.3f} -> {sum(losses[-10:]) / 10:.3f} "
          f"({rate:.1f} steps/s); perplexity {math.exp(sum(losses[-10:]) / 10):.1f}")
    text, speed = generate(model, "The ", 80, cached=True)
    print(f"generated with a KV cache ({speed:.0f} tokens/s):\n{text}")


if __name__ == "__main__":
    main()
