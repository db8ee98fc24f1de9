"""Complete prompts with a trained checkpoint (KV-cached decoding), or chat with it in a prompt loop.

    python launch/generate.py --ckpt auto --run-dir runs/tiny-shakespeare --prompt "JULIET:"
    python launch/generate.py --ckpt runs/tiny-shakespeare/checkpoints/step_0000300.pt --prompt "ROMEO:" --tokens 200
    python launch/generate.py --ckpt auto --prompt "ROMEO:" --prompt "JULIET:" --temperature 0.7 --top-p 0.9
    python launch/generate.py --ckpt auto --prompt "KING:" --stop "\n\n" --repetition-penalty 1.2 --seed 3
    python launch/generate.py --ckpt auto --interactive          # a prompt loop; /help lists its commands

`--ckpt auto` takes the newest checkpoint in --run-dir and says which. Several --prompt flags are
completed together in one batch. Output streams as it is generated (one prompt, or interactive).

Seeds (dsmoe/infer/seeds.py): the base seed is --seed, else a random one (printed, so a run can be
repeated); the i-th prompt of the command or of the interactive session samples from a seed derived
from the base and i. So several prompts, or the same prompt typed twice, get their own continuations,
and the same --seed with the same prompts repeats them.
"""
import argparse
import dataclasses
import sys
import time

import common  # noqa: F401  (puts the checkout on sys.path)

from dsmoe.infer import SamplingParams, generate
from dsmoe.checkpoint import CheckpointError, resolve
from dsmoe.checkpoint.load import load_model
from dsmoe.infer.seeds import base_seed, prompt_seed

HELP = """commands:
  /set NAME VALUE   change a setting (max_new_tokens temperature top_k top_p repetition_penalty seed stop);
                    /set seed N restarts the session's seeds from N, /set seed none from a random one
  /show             the current settings
  /quit             leave (or Ctrl-D); Ctrl-C stops a generation
anything else is a prompt ("\\n" in it is a newline)"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint file or sharded directory, or 'auto' for the newest in --run-dir")
    p.add_argument("--run-dir", default="runs/tiny-shakespeare")
    p.add_argument("--prompt", action="append", help="a prompt (repeat for a batch); default 'ROMEO:'")
    p.add_argument("--interactive", action="store_true", help="read prompts in a loop")
    p.add_argument("--tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus mass; 1 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats; 1 = off")
    p.add_argument("--stop", action="append", default=[], help="end the output before this string (repeatable)")
    p.add_argument("--seed", type=int, default=None,
                   help="base seed: the same seed and prompts give the same outputs (default: random, printed)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def unescape(text: str) -> str:
    return text.replace("\\n", "\n").replace("\\t", "\t")


def set_field(params: SamplingParams, name: str, value: str) -> SamplingParams:
    """`/set NAME VALUE`: the value parsed as the field's type; raises ValueError naming a bad one."""
    fields = {f.name: f for f in dataclasses.fields(SamplingParams)}
    if name not in fields or name == "ignore_eos":
        raise ValueError(f"unknown setting '{name}'; settings: {', '.join(n for n in fields if n != 'ignore_eos')}")
    default = fields[name].default
    if name == "stop":
        parsed = (unescape(value),) if value else ()
    elif name == "seed":
        parsed = None if value.lower() == "none" else int(value)
    else:
        parsed = type(default)(value)
    return dataclasses.replace(params, **{name: parsed})


def seeded(params: SamplingParams, base: int, index: int) -> SamplingParams:
    """The settings of prompt `index` under base seed `base`."""
    return dataclasses.replace(params, seed=prompt_seed(base, index))


def show(params: SamplingParams, base: int) -> str:
    """`/show`: one setting per line, as /set takes them."""
    lines = []
    for f in dataclasses.fields(SamplingParams):
        value = getattr(params, f.name)
        if f.name == "ignore_eos":
            continue
        if f.name == "seed":
            value = f"{base} ({'set' if value is not None else 'random'}; each prompt draws from its own seed under it)"
        elif f.name == "stop":
            value = " ".join(repr(s) for s in value) or "(none)"
        lines.append(f"  {f.name:<19}{value}")
    return "\n".join(lines)


def stream(model, tok, prompt: str, params: SamplingParams) -> None:
    print(prompt, end="", flush=True)
    t0 = time.perf_counter()
    seq = generate(model, [prompt], params, tok, on_text=lambda _, piece: print(piece, end="", flush=True))[0]
    dt = time.perf_counter() - t0
    print()
    print(f"[{len(seq.out)} tokens, {len(seq.out) / dt:.1f} tokens/s, {seq.finish_reason}]", file=sys.stderr)


def interactive(model, tok, params: SamplingParams) -> None:
    """The prompt loop; `params.seed` is the session's base seed (None: random)."""
    print(HELP, file=sys.stderr)
    base, count = base_seed(params.seed), 0
    while True:
        try:
            line = input("prompt> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if line.strip() in ("/quit", "/exit"):
            return
        if line.startswith("/"):
            parts = line[1:].split(maxsplit=2)
            try:
                if parts[:1] == ["set"] and len(parts) >= 2:
                    params = set_field(params, parts[1], parts[2] if len(parts) == 3 else "")
                    if parts[1] == "seed":
                        base, count = base_seed(params.seed), 0
                elif parts[:1] != ["show"]:
                    print(HELP, file=sys.stderr)
                    continue
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                continue
            print(show(params, base), file=sys.stderr)
            continue
        if not line.strip():
            continue
        try:
            stream(model, tok, unescape(line), seeded(params, base, count))
        except KeyboardInterrupt:
            print("\n[stopped]", file=sys.stderr)
        except ValueError as e:  # a prompt too long for the context
            print(f"error: {e}", file=sys.stderr)
        count += 1


def complete(model, tok, prompts: list[str], params: SamplingParams, base: int) -> list[str]:
    """Every prompt's continuation, completed together; prompt i draws from prompt_seed(base, i)."""
    seqs = generate(model, prompts, [seeded(params, base, i) for i in range(len(prompts))], tok)
    return [seq.text for seq in seqs]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                stop=tuple(unescape(s) for s in args.stop), seed=args.seed)
        path = resolve(args.ckpt, args.run_dir)
        if args.ckpt == "auto":
            print(f"checkpoint: {path} (the newest in {args.run_dir})", file=sys.stderr)
        model, tok, _ = load_model(str(path), args.run_dir, args.device)
        if args.interactive:
            interactive(model, tok, params)
            return 0
        prompts = [unescape(p) for p in args.prompt or ["ROMEO:"]]
        base = base_seed(args.seed)
        if args.seed is None:
            print(f"seed: {base} (random; --seed {base} repeats these outputs)", file=sys.stderr)
        if len(prompts) == 1:
            stream(model, tok, prompts[0], seeded(params, base, 0))
            return 0
        for prompt, text in zip(prompts, complete(model, tok, prompts, params, base)):
            print(prompt + text + "\n")
    except (CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
