"""``hybridlm <command>``: a thin layer that parses arguments and calls the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hybridlm.config import ModelConfig


def _load_config(args: argparse.Namespace) -> ModelConfig:
    """The model named by --preset NAME or --config FILE (or a positional preset/config.json)."""
    source = getattr(args, "model", None) or args.preset or args.config
    if source is None:
        raise SystemExit("error: give a model: --preset NAME or --config FILE")
    path = Path(source)
    if path.suffix == ".json" or path.is_file():
        return ModelConfig.from_json(path)
    if path.is_dir() and (path / "config.json").is_file():
        from hybridlm.interop import load_config  # any supported checkpoint layout

        return load_config(path)
    return ModelConfig.preset(source)


def cmd_presets(args: argparse.Namespace) -> None:
    from hybridlm.presets import DESCRIBE_ONLY, PRESETS

    for name in PRESETS:
        config = ModelConfig.preset(name)
        note = "  (describe only)" if name in DESCRIBE_ONLY else ""
        print(f"{name:<14} {config.family:<12} d_model {config.d_model:<5} layers {config.layers}{note}")


def cmd_describe(args: argparse.Namespace) -> None:
    from hybridlm.describe import describe, format_description

    print(format_description(describe(_load_config(args), context=args.context, dtype=args.dtype,
                                      batch=args.batch)))


def cmd_generate(args: argparse.Namespace) -> None:
    import torch

    from hybridlm.model import HybridLM
    from hybridlm.tokenizer import ByteTokenizer, load_tokenizer

    tokenizer = ByteTokenizer()
    if args.checkpoint:  # any supported layout; its tokenizer.json when it has one
        model = HybridLM.from_pretrained(args.checkpoint)
        tokenizer = load_tokenizer(args.checkpoint)
    else:
        if args.seed is not None:
            torch.manual_seed(args.seed)
        model = HybridLM(_load_config(args))
        print("(randomly initialised weights: this checks the wiring, the text is noise)", file=sys.stderr)
    model.eval()
    ids = tokenizer.encode(args.prompt, add_bos=True)
    if max(ids) >= model.config.vocab_size:
        name = "byte tokenizer" if isinstance(tokenizer, ByteTokenizer) else "tokenizer"
        raise SystemExit(f"error: the {name} needs vocab_size >= {tokenizer.vocab_size}, "
                         f"the model has {model.config.vocab_size}")
    print(args.prompt, end="", flush=True)
    pending: list[int] = []
    for token in model.stream(torch.tensor([ids]), args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              eos_token_id=tokenizer.eos_token_id):
        pending.append(int(token[0]))
        text = tokenizer.decode(pending)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            print(text, end="", flush=True)
            pending.clear()
    print(tokenizer.decode(pending))


def cmd_serve(args: argparse.Namespace) -> None:
    from hybridlm.serve import AuditLog, AuthConfig, Limits, create_app, run
    from hybridlm.serve.app import bind, load_served_model

    auth = AuthConfig.load(args.auth) if args.auth else None
    sock = bind(args.host, args.port, authenticated=auth is not None)  # refuse a public host before loading
    try:
        models = {}
        for spec in args.models:
            served = load_served_model(spec, seed=args.seed)
            if served.name in models:
                raise ValueError(f"MODEL {spec}: a second model named {served.name!r}; name one NAME=MODEL")
            models[served.name] = served
        audit_config = auth.audit if auth else {}
        audit = AuditLog.from_config(audit_config, args.audit_log, where=f"{args.auth}: [audit]")
        print(f"audit log: {audit.path}", file=sys.stderr)
        if audit.torn is not None:
            print(f"audit log: its last line was cut by a crash; set aside in {audit.torn}", file=sys.stderr)
        limits = Limits(max_context=args.max_context, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes,
                        head_timeout=args.head_timeout, body_timeout=args.body_timeout)
        app = create_app(models, auth, audit, limits, max_batch=args.max_batch, max_queue=args.max_queue,
                         allowed_hosts=args.allowed_host)
    except BaseException:
        sock.close()  # an error before serving: give the port back
        raise
    run(app, authenticated=auth is not None, sock=sock)


def cmd_audit(args: argparse.Namespace) -> None:
    import json

    from hybridlm.serve.audit import query

    if not Path(args.file).exists():
        raise FileNotFoundError(f"{args.file}: no such audit log")
    for record in query(args.file, args.principal, args.since, args.until, args.status, args.limit):
        if args.json:
            print(json.dumps(record, ensure_ascii=False))
            continue
        prompt = json.dumps(record.get("prompt"), ensure_ascii=False)
        print(f"{record.get('time')}  {record.get('status')}  {record.get('principal') or '-'}"
              f"({record.get('role') or '-'})  {record.get('endpoint')}  {record.get('model') or '-'}  "
              f"tokens {record.get('prompt_tokens')}+{record.get('completion_tokens')}  "
              f"{record.get('latency_ms')} ms  {prompt[:60]}")


def cmd_convert(args: argparse.Namespace) -> None:
    import torch

    from hybridlm.model import HybridLM
    from hybridlm.tokenizer import load_tokenizer

    to = args.to or ("gguf" if str(args.dst).endswith(".gguf") else "hybridlm")
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, None: None}[args.dtype]
    model = HybridLM.from_pretrained(args.src, format=args.source_format)
    tokenizer = load_tokenizer(args.src)
    if to == "gguf":
        from hybridlm.interop.gguf import export_gguf

        written = export_gguf(model, args.dst, tokenizer=tokenizer, dtype=dtype or torch.float32)
    else:
        written = model.save_pretrained(args.dst, format=to, tokenizer=tokenizer, dtype=dtype)
    print(f"{args.src} -> {args.dst} ({written}): {model.config.summary()}")


def cmd_train(args: argparse.Namespace) -> None:
    from hybridlm.train.launch import run_training

    model = _load_config(args) if (args.preset or args.config) else None
    settings = {name: getattr(args, name) for name in TRAIN_SETTINGS}
    settings["bf16"] = True if args.bf16 else None
    settings["fsdp"] = True if args.fsdp else None
    try:
        result = run_training(args.out, model=model, data=args.data, task=args.task, tokenizer=args.tokenizer,
                              resume=args.resume, settings=settings, progress=not args.no_progress)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    final = [r for r in result.history if "eval_loss" in r]
    summary = f"; eval loss {final[-1]['eval_loss']:.4f}" if final else ""
    print(f"trained to step {result.step}{summary}; checkpoint {result.out_dir / 'checkpoint'}", file=sys.stderr)


TRAIN_SETTINGS = ("steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup_steps", "weight_decay", "grad_clip",
                  "seed", "eval_every", "eval_batches", "save_every", "log_every")


def _post_training(args: argparse.Namespace, run) -> None:
    from hybridlm.train.lora import LoraSettings

    settings = {name: getattr(args, name) for name in TRAIN_SETTINGS}
    settings["bf16"] = True if args.bf16 else None
    lora = None if args.lora is None else LoraSettings.parse(args.lora)
    try:
        result = run(lora=lora, settings=settings)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    evals = [r for r in result.history if any(k.startswith("eval_") for k in r)]
    shown = {k: round(v, 4) for k, v in (evals[-1] if evals else {}).items() if k != "step"}
    where = result.out_dir / ("merged" if args.merge else "checkpoint")
    print(f"trained to step {result.step}; held out: {shown}; model {where}", file=sys.stderr)


def cmd_sft(args: argparse.Namespace) -> None:
    from hybridlm.train.post_training import run_sft

    _post_training(args, lambda **kw: run_sft(args.model, args.data, args.out, eval_data=args.eval_data,
                                              packing=True if args.packing else None, merge=args.merge,
                                              resume=args.resume, progress=not args.no_progress, **kw))


def cmd_dpo(args: argparse.Namespace) -> None:
    from hybridlm.train.post_training import run_dpo

    _post_training(args, lambda **kw: run_dpo(
        args.model, args.data, args.out, eval_data=args.eval_data, loss=args.loss, beta=args.beta,
        label_smoothing=args.label_smoothing, simpo_gamma=args.simpo_gamma, sft_weight=args.sft_weight,
        reference=args.reference,
        merge=args.merge, resume=args.resume, progress=not args.no_progress, **kw))


def _add_train_settings(p: argparse.ArgumentParser, defaults: str) -> None:
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help=f"sequences (or pairs) per process and micro-batch ({defaults})")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--grad-clip", type=float, help="max gradient norm, 0 to disable (default 1.0)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-every", type=int, help="steps between held-out measurements")
    p.add_argument("--eval-batches", type=int)
    p.add_argument("--save-every", type=int, help="steps between checkpoints (default: at the end and on Ctrl-C)")
    p.add_argument("--log-every", type=int, help="steps between metrics lines (default 10)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_post_training(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("model", nargs="?", help="the checkpoint directory to start from (hybridlm or Hugging Face)")
    p.add_argument("--data", help=".jsonl, .parquet or .arrow file in TRL's format")
    p.add_argument("--eval-data", help="held-out file (default: the last 5%% of --data)")
    p.add_argument("--out", help=f"output directory: checkpoint/, metrics.jsonl (default runs/{kind})")
    p.add_argument("--resume", help="continue the run in this directory")
    p.add_argument("--lora", help="train a LoRA adapter (peft): r=16,alpha=32,dropout=0,targets=a+b (default "
                                  "targets: every block's linear layers and MoE experts)")
    p.add_argument("--merge", action="store_true", help="with --lora, also write OUT/merged/, the adapter folded "
                                                        "into the model in hybridlm's format")


def cmd_eval(args: argparse.Namespace) -> None:
    from hybridlm.evaluate import perplexity, task_accuracy
    from hybridlm.model import HybridLM
    from hybridlm.train import checkpoint_path

    if (args.task is None) == (args.data is None):
        raise ValueError("eval: give --task NAME (accuracy per length) or --data PATH (perplexity), one of them")
    path = checkpoint_path(args.checkpoint)
    model = HybridLM.from_pretrained(path)
    if args.task is not None:
        from hybridlm.data.tasks import get_task

        task = get_task(args.task)
        lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
        print(f"{args.task}: accuracy on {args.samples} sequences per length ({model.config.summary()})")
        for length in lengths:
            s = task_accuracy(model, task, length, n_samples=args.samples, batch_size=args.batch_size)
            print(f"  length {length:>7,}  accuracy {s.accuracy:7.2%}  loss {s.loss:.4f}")
        return
    from hybridlm.data.token_file import tokenize_corpus
    from hybridlm.tokenizer import load_tokenizer

    tokens = tokenize_corpus(args.data, load_tokenizer(path))
    s = perplexity(model, tokens, args.seq_len, batch_size=args.batch_size, max_windows=args.max_windows)
    print(f"{args.data}: {s.n:,} tokens scored, loss {s.loss:.4f} nats/token, perplexity {s.perplexity:.3f}")


def _int_list(text: str, name: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) <= 0:
        raise ValueError(f"{name}: expected comma-separated positive integers, got {text!r}")
    return values


def cmd_bench(args: argparse.Namespace) -> None:
    if args.attention:
        return _bench_attention(args)
    from hybridlm.bench import BenchSettings, format_report, run, save_plots, write_json
    from hybridlm.bench.subjects import PEERS
    from hybridlm.presets import DESCRIBE_ONLY, PRESETS

    presets = tuple(p.strip() for p in args.presets.split(",") if p.strip())
    for p in presets:
        if p not in PRESETS or p in DESCRIBE_ONLY:
            raise ValueError(f"--presets: {p!r} is not a runnable preset; expected some of "
                             f"{sorted(set(PRESETS) - DESCRIBE_ONLY)}")
    peers = tuple(p.strip() for p in (args.peer or []) for p in p.split(",") if p.strip())
    for p in peers:
        if p not in PEERS:
            raise ValueError(f"--peer: unknown {p!r}; expected one of {PEERS}")
    if args.threads <= 0 or args.repeats <= 0 or args.budget <= 0 or args.rounds <= 0:
        raise ValueError(f"--threads, --repeats, --budget and --rounds: expected positive numbers, got "
                         f"{args.threads}, {args.repeats}, {args.budget}, {args.rounds}")
    if args.train_length < 0:
        raise ValueError(f"--train-length: expected a token count >= 0 (0 skips training), got {args.train_length}")
    settings = BenchSettings(presets=presets, peers=peers, threads=args.threads,
                             prefill_lengths=_int_list(args.prefill, "--prefill"),
                             decode_contexts=_int_list(args.decode, "--decode"), train_length=args.train_length,
                             repeats=args.repeats, budget_s=args.budget, scan=not args.no_scan,
                             rounds=args.rounds)
    results = run(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_report(results))
    if args.json:
        write_json(results, args.json)
        print(f"JSON: {args.json}", file=sys.stderr)
    if args.plots:
        for path in save_plots(results, args.plots):
            print(f"plot: {path}", file=sys.stderr)


def _bench_attention(args: argparse.Namespace) -> None:
    from hybridlm.bench import attention

    if args.threads <= 0 or args.repeats <= 0:
        raise ValueError(f"--threads and --repeats: expected positive numbers, got {args.threads}, {args.repeats}")
    inputs = tuple(i.strip() for i in args.attention_inputs.split(",") if i.strip())
    for kind in inputs or ("",):
        if kind not in ("random", "trained"):
            raise ValueError(f"--attention-inputs: expected 'random' and/or 'trained', got {kind!r}")
    settings = attention.AttentionBenchSettings(
        lengths=_int_list(args.attention_lengths, "--attention-lengths"), inputs=inputs, threads=args.threads,
        repeats=args.repeats, model=args.attention_model)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    model = tokenizer = None
    if "trained" in inputs:
        model, tokenizer = (attention.load_model(args.attention_model) if args.attention_model
                            else _train_attention_model(settings, log))
    results = attention.run(settings, model, tokenizer, log=log)
    print(attention.format_report(results))
    if args.json:
        attention.write_json(results, args.json)
        print(f"JSON: {args.json}", file=sys.stderr)
    if args.plots:
        for path in attention.save_plot(results, args.plots):
            print(f"plot: {path}", file=sys.stderr)


def _train_attention_model(settings, log):
    # The bench's small Transformer (bench.attention.model_config), trained on the built-in corpus here: the bench
    # measures, the trainer trains, and only the CLI sits above both
    import tempfile

    from hybridlm.bench import attention
    from hybridlm.data.source import TextSource
    from hybridlm.data.token_file import tokenize_corpus
    from hybridlm.model import HybridLM
    from hybridlm.tokenizer import load_tokenizer
    from hybridlm.train import TrainConfig, checkpoint_path, train

    tokenizer = load_tokenizer(None)
    config = attention.model_config(settings, tokenizer.vocab_size)
    log(f"training {config.summary()} for {settings.train_steps} steps on the built-in corpus")
    with tempfile.TemporaryDirectory() as out:
        train(config, TrainConfig(steps=settings.train_steps, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=30,
                                  eval_every=0, eval_batches=1, seed=settings.seed),
              TextSource(tokenize_corpus(None, tokenizer), 256, settings.seed), out, progress=False)
        return HybridLM.from_pretrained(checkpoint_path(out)).eval(), tokenizer


def _task_params(given: list[str] | None) -> dict[str, int] | None:
    # ["n_pairs=16", "vocab_size=128"] -> {"n_pairs": 16, "vocab_size": 128}
    if not given:
        return None
    params = {}
    for item in given:
        name, _, value = item.partition("=")
        if not name or not value.lstrip("-").isdigit():
            raise ValueError(f"--task-param: expected NAME=INTEGER (e.g. n_pairs=16), got {item!r}")
        params[name.strip()] = int(value)
    return params


def cmd_compare(args: argparse.Namespace) -> None:
    from hybridlm.compare import CompareSettings, compare
    from hybridlm.compare_report import summary_table

    def ints(text: str | None) -> list[int] | None:
        return None if text is None else [int(x) for x in text.split(",") if x.strip()]

    def floats(text: str | None) -> list[float] | None:
        try:
            return None if text is None else [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"lrs: expected comma-separated numbers, got {text!r}") from None

    given = {"task": args.task, "families": None if args.families is None else args.families.split(","),
             "d_model": args.d_model, "n_layers": args.n_layers, "train_length": args.train_length,
             "steps": args.steps, "short_length": args.short_length, "short_steps": args.short_steps,
             "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
             "eval_lengths": ints(args.lengths), "eval_samples": args.samples, "contexts": ints(args.contexts),
             "threads": args.threads, "workers": args.workers, "weight_decay": args.weight_decay,
             "widths": ints(args.widths), "lrs": floats(args.lrs), "n_heads": args.heads,
             "attention_batch_scale": args.attention_batch_scale, "task_params": _task_params(args.task_param)}
    given = {k: v for k, v in given.items() if v is not None}
    settings = CompareSettings.quick(**given) if args.quick else CompareSettings(**given)
    results = compare(settings, args.out, progress=not args.no_progress)
    print(summary_table(results))
    print(f"\nreport: {Path(args.out) / 'report.md'} (results.json, plots beside it); "
          f"{results['total_seconds']:.0f} s", file=sys.stderr)
    if results.get("plot_note"):
        print(results["plot_note"], file=sys.stderr)


def cmd_apikey(args: argparse.Namespace) -> None:
    from hybridlm.serve.auth import new_api_key

    key, digest = new_api_key()
    print(f"# API key (give it to the client; it is stored nowhere): {key}\n# for the --auth file:\n[[keys]]\n"
          f'principal = "{args.principal}"\nrole = "{args.role}"\nsha256 = "{digest}"')


def cmd_coe_build(args: argparse.Namespace) -> None:
    from hybridlm.coe.build import build, parse_expert_specs

    out = build(args.out, parse_expert_specs(args.expert), args.data, router=args.router, embedder=args.embedder,
                k=args.k, threshold=args.threshold, fallback=args.fallback, copy=args.copy, seed=args.seed)
    print(f"wrote {out}", file=sys.stderr)


def cmd_coe_eval(args: argparse.Namespace) -> None:
    import json

    from hybridlm.coe.evaluation import evaluate_directory

    result, report = evaluate_directory(args.coe_dir, args.data, out=args.out, gen_tokens=args.gen_tokens)
    print(report)
    print(json.dumps(result, indent=2))


def cmd_coe_demo(args: argparse.Namespace) -> None:
    from hybridlm.coe.demo import DemoSettings, run_demo

    settings = DemoSettings.full() if args.size == "full" else DemoSettings.tiny()
    result = run_demo(args.out, settings, progress=not args.no_progress)
    if args.strict and not all(result["eval"]["floors"].values()):
        raise SystemExit(1)


def _add_coe(sub) -> None:
    coe = sub.add_parser("coe", help="composition of experts: route each prompt to one of several whole models")
    coe_sub = coe.add_subparsers(dest="coe_command", required=True)
    p = coe_sub.add_parser("build", help="write a CoE directory: experts by hash, a router trained on --data")
    p.add_argument("out", help="the CoE directory to write (replaced atomically)")
    p.add_argument("--expert", action="append", required=True, metavar="NAME=DIR",
                   help="an expert checkpoint (repeat; at least two)")
    p.add_argument("--data", required=True, help='calibration JSONL: {"prompt", "expert"} labels or '
                   '{"prompt", "completion"} records labelled by the oracle (lowest loss)')
    p.add_argument("--router", default="knn", help="knn (default) or logistic")
    p.add_argument("--embedder", default=None, metavar="NAME",
                   help="the expert whose mean final hidden state is the router's feature (default: n-grams only)")
    p.add_argument("--k", type=int, default=5, help="neighbours of the kNN router")
    p.add_argument("--threshold", type=float, default=0.0, help="below this confidence --fallback answers")
    p.add_argument("--fallback", default=None, metavar="NAME", help="the expert that answers low-confidence prompts")
    p.add_argument("--copy", action="store_true", help="copy the experts into the CoE directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the logistic router's initialisation")
    p.set_defaults(func=cmd_coe_build)
    p = coe_sub.add_parser("eval", help="routing accuracy, quality and cost against the oracle on held-out data")
    p.add_argument("coe_dir")
    p.add_argument("--data", required=True, help='held-out JSONL of {"prompt", "completion"} records')
    p.add_argument("--out", default=None, help="where eval.json and the cost-quality curve go (default: COE_DIR)")
    p.add_argument("--gen-tokens", type=int, default=64, help="generation length the router overhead is judged by")
    p.set_defaults(func=cmd_coe_eval)
    p = coe_sub.add_parser("demo", help="train experts on distinct domains, build, evaluate, check the floors")
    p.add_argument("out")
    p.add_argument("--size", choices=["full", "tiny"], default="full", help="full: the recorded run; tiny: seconds")
    p.add_argument("--strict", action="store_true", help="exit 1 when a floor fails")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_coe_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named model shapes")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("describe", help="parameters, weight bytes and state/KV bytes at a context length")
    p.add_argument("model", nargs="?", help="preset name, config.json or checkpoint directory")
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument("--context", type=int, default=2048, help="tokens of context (default 2048)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--batch", type=int, default=1)
    p.set_defaults(func=cmd_describe)

    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("--preset")
    p.add_argument("--config")
    p.add_argument("--checkpoint", help="checkpoint directory written by save_pretrained")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert a checkpoint between hybridlm, Hugging Face, mamba_ssm and GGUF")
    p.add_argument("src", help="checkpoint directory: hybridlm, Hugging Face (Mamba, Mamba2, Llama, Mistral, "
                               "Mixtral, Jamba) or mamba_ssm; detected from its config.json")
    p.add_argument("dst", help="output directory (or OUT.gguf)")
    p.add_argument("--to", choices=["hybridlm", "hf", "mamba_ssm", "gguf"],
                   help="output layout (default: gguf for a .gguf name, else hybridlm)")
    p.add_argument("--from", dest="source_format", help="source layout, if detection should be skipped")
    p.add_argument("--dtype", choices=["f32", "f16", "bf16"], help="cast float weights (default: keep; gguf: f32)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [serve] extra)")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="checkpoint directory, composition-of-experts directory (served as one name) or preset name "
                        "(random weights), optionally NAME=MODEL")
    p.add_argument("--host", default="127.0.0.1", help="without --auth only loopback is allowed")
    p.add_argument("--port", type=int, default=8000, help="0 for any free port")
    p.add_argument("--auth", help="TOML/YAML file: API key hashes, roles, OIDC issuer/audience/JWKS, audit log")
    p.add_argument("--audit-log", help="audit log file (default: the auth file's [audit] path, else "
                                       "./hybridlm-audit.jsonl)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting before 429 (default 64)")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name to answer (repeat); default: the loopback names without --auth, any with it")
    p.add_argument("--max-context", type=int, default=2048, help="prompt + completion tokens (default 2048)")
    p.add_argument("--max-body-bytes", type=int, default=1_048_576,
                   help="a request body larger is refused with 413 (default 1 MiB)")
    p.add_argument("--head-timeout", type=float, default=10.0,
                   help="seconds for a request's headers to arrive before the connection is closed (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds for a request's body to arrive after its headers, else a 408 (default 30)")
    p.add_argument("--max-tokens", type=int, default=1024, help="completion tokens per request (default 1024)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed of preset models")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("train", help="train a model on text or a synthetic task (torchrun for several processes)")
    p.add_argument("--preset", help="model shape (`hybridlm presets`); or --config FILE")
    p.add_argument("--config", help="model config.json")
    p.add_argument("--data", nargs="+", help="text files, directories, .jsonl files with a 'text' field, or "
                                             "'stdlib' (the default: the Python standard library's sources)")
    p.add_argument("--task", help="train on a synthetic task instead: induction_heads, selective_copy, mqar")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer.json (default: bytes)")
    p.add_argument("--out", help="output directory: checkpoint/, metrics.jsonl, tokens/ (default: the resumed "
                                 "run's, else runs/train)")
    p.add_argument("--resume", help="continue the run in this directory (its settings unless given again)")
    _add_train_settings(p, "default 16; defaults: 1000 steps, lr 1e-3, seq-len 256, eval every 200 steps")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard parameters, gradients and optimizer "
                                                       "state across processes (FSDP2) instead of DDP, for models "
                                                       "that do not fit one device")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat or prompt/completion data (loss on completions)")
    _add_post_training(p, "sft")
    p.add_argument("--packing", action="store_true", help="join examples into full rows instead of padding each")
    _add_train_settings(p, "default 8; defaults: 200 steps, lr 1e-4, seq-len 512")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("dpo", help="preference optimisation (DPO, IPO, hinge, robust, SimPO, ORPO) on chosen/rejected "
                                   "pairs")
    _add_post_training(p, "dpo")
    p.add_argument("--loss", help="sigmoid (DPO; the default), ipo, hinge, robust, simpo or orpo")
    p.add_argument("--beta", type=float, help="the loss's beta (default 0.1)")
    p.add_argument("--label-smoothing", type=float, help="robust: the assumed share of flipped labels (default 0)")
    p.add_argument("--simpo-gamma", type=float, help="simpo: the target reward margin (default 0.5)")
    p.add_argument("--sft-weight", type=float, help="add this times the chosen tokens' mean NLL (RPO; default 0)")
    p.add_argument("--reference", help="frozen (a copy of MODEL; the default), precomputed (its log-probs, computed "
                                       "once: one model in memory) or adapter (with --lora; its default)")
    _add_train_settings(p, "default 8; defaults: 200 steps, lr 1e-5, seq-len 512")
    p.set_defaults(func=cmd_dpo)

    p = sub.add_parser("eval", help="task accuracy at several lengths, or perplexity on text, of a checkpoint")
    p.add_argument("checkpoint", help="checkpoint directory, or a `hybridlm train` output directory")
    p.add_argument("--task", help="induction_heads, selective_copy or mqar")
    p.add_argument("--lengths", default="256,1024,4096", help="comma-separated sequence lengths")
    p.add_argument("--samples", type=int, default=64, help="sequences per length (default 64)")
    p.add_argument("--data", nargs="+", help="text for perplexity (files, directories, .jsonl, 'stdlib')")
    p.add_argument("--seq-len", type=int, default=256, help="window length for perplexity (default 256)")
    p.add_argument("--max-windows", type=int, help="score at most this many windows")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train Transformer, Mamba-1, Mamba-2, hybrid (and linear-attention) models "
                                       "side by side on a task; "
                                       "report accuracy vs length, speed and memory vs context")
    p.add_argument("--task", help="induction_heads (default), selective_copy or mqar")
    p.add_argument("--families", help="comma-separated families: transformer,mamba,mamba2,hybrid (the default) and "
                                      "linear,performer,based,based_hybrid,retnet,gla,sliding_window,lsh")
    p.add_argument("--task-param", action="append", metavar="NAME=INT",
                   help="a task parameter, e.g. n_pairs=16 for mqar (repeat for more)")
    p.add_argument("--widths", help="comma-separated widths (d_model): train every family at each (recall vs "
                                    "width, as Zoology)")
    p.add_argument("--d-model", type=int)
    p.add_argument("--n-layers", type=int)
    p.add_argument("--heads", type=int, help="attention heads (default d_model // 8; Zoology's MQAR runs use 1)")
    p.add_argument("--train-length", type=int, help="training sequence length (default 256)")
    p.add_argument("--short-length", type=int, help="length of the curriculum's first steps (default 64)")
    p.add_argument("--short-steps", type=int, help="steps at the short length (default 2000; 0: none)")
    p.add_argument("--steps", type=int, help="training steps per family (attention takes 1/4 of them with 4x the "
                                             "batch, the same tokens: --attention-batch-scale)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--attention-batch-scale", type=int,
                   help="times the batch the attention families take, for as many times fewer steps (default 4; "
                        "1 for MQAR from 32 pairs: there attention needs the steps)")
    p.add_argument("--lr", type=float)
    p.add_argument("--lrs", help="comma-separated learning rates: train every run at each and report the best "
                                 "(Zoology reports the best of 4 per width)")
    p.add_argument("--seed", type=int)
    p.add_argument("--lengths", help="comma-separated evaluation lengths")
    p.add_argument("--samples", type=int, help="evaluation sequences per length")
    p.add_argument("--contexts", help="comma-separated context lengths for speed and memory")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay on matrices (default 0)")
    p.add_argument("--threads", type=int, help="torch/numba threads per family (default 1: fastest for these "
                                               "small models)")
    p.add_argument("--workers", type=int, help="families trained at once, a process each (default 2)")
    p.add_argument("--out", default="compare-out", help="output directory (default compare-out)")
    p.add_argument("--quick", action="store_true", help="a tiny run of seconds (tests, installation check)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("audit", help="query a serve audit log")
    p.add_argument("file", help="the audit log (its rotated files FILE.1, ... are read too)")
    p.add_argument("--principal")
    p.add_argument("--since", help="ISO 8601 time or Unix seconds")
    p.add_argument("--until", help="ISO 8601 time or Unix seconds")
    p.add_argument("--status", type=int)
    p.add_argument("--limit", type=int, help="only the last N matches")
    p.add_argument("--json", action="store_true", help="print the records as JSON lines")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("apikey", help="make a random API key and the hash to put in a serve --auth file")
    p.add_argument("--principal", default="someone", help="who the key is for (goes to the audit log)")
    p.add_argument("--role", default="user")
    p.set_defaults(func=cmd_apikey)

    p = sub.add_parser("bench", help="prefill/decode/training speed and memory vs context, ours and peers")
    p.add_argument("--presets", default="llama-130m,mamba-130m,mamba2-130m,jamba-130m",
                   help="comma-separated presets (random weights, float32)")
    p.add_argument("--peer", action="append", help="hf, mambapy and/or llamacpp (repeat or comma-separate)")
    p.add_argument("--threads", type=int, default=2, help="threads for us and every peer (default 2)")
    p.add_argument("--prefill", default="256,512,1024,2048,4096,8192,16384", help="prompt lengths")
    p.add_argument("--decode", default="512,2048,8192,32768,65536", help="decode contexts")
    p.add_argument("--train-length", type=int, default=512,
                   help="tokens of the forward+backward step (0: skip it)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median; after a warm-up)")
    p.add_argument("--budget", type=float, default=120, help="seconds per preset and subject (default 120)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure ours and the peers in turn this many times per preset; each figure the median "
                        "over rounds (a shared machine's drift then hits both sides of a ratio)")
    p.add_argument("--no-scan", action="store_true", help="skip the isolated selective-scan measurement")
    p.add_argument("--attention", action="store_true",
                   help="measure attention and its approximations instead (sliding window, Performer, LSH, "
                        "Nystromformer, Skyformer): time, memory and error against exact attention by length")
    p.add_argument("--attention-lengths", default="1024,4096,16384", help="with --attention: sequence lengths")
    p.add_argument("--attention-inputs", default="random,trained",
                   help="with --attention: random and/or trained (a trained model's q, k, v on real text)")
    p.add_argument("--attention-model", help="with --attention: a checkpoint whose last attention layer gives the "
                                             "trained q, k, v (default: a small Transformer trained on the spot)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--plots", help="write PNG plots to this directory (needs matplotlib)")
    p.set_defaults(func=cmd_bench)

    _add_coe(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
