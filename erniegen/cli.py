"""``erniegen`` command line: finetune, generate, distill, evaluate, bench, tradeoff, serve, calibrate, exit-gate,
span-vocab, pretrain, plot."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .data import Fields


@dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: finite, and within ``low``/``high`` (open ends excluded)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return "a finite number"

    def __contains__(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.low is None or (value > self.low if self.low_open else value >= self.low))
                and (self.high is None or (value < self.high if self.high_open else value <= self.high)))


AT_LEAST_1, AT_LEAST_0, FRACTION = Range(1), Range(0), Range(0, 1)
# Every numeric option of every command, by argparse dest; one name means one thing in every command.
OPTION_RANGES: dict[str, Range] = {
    "batch_size": AT_LEAST_1, "num_beams": AT_LEAST_1, "max_length": AT_LEAST_1, "min_length": AT_LEAST_0,
    "length_penalty": Range(), "no_repeat_ngram_size": AT_LEAST_0, "max_token_run": AT_LEAST_0,
    "iterations": AT_LEAST_1,
    "length_beam": AT_LEAST_1, "num_samples": AT_LEAST_1, "fixed_length": AT_LEAST_1,
    "epochs": AT_LEAST_1, "max_steps": AT_LEAST_1, "grad_accum": AT_LEAST_1, "lr": Range(0, low_open=True),
    "warmup_ratio": FRACTION, "warmup_steps": AT_LEAST_0, "noise_rate": FRACTION, "word_weight": FRACTION,
    "label_smoothing": Range(0, 1, high_open=True),
    "noise_ramp": FRACTION, "head_warmup_steps": AT_LEAST_0, "adapt_steps": AT_LEAST_0,
    "ema_decay": Range(0, 1, high_open=True),
    "attention_dropout": Range(0, 1, high_open=True), "dropout": Range(0, 1, high_open=True),
    "max_source_len": Range(3), "max_target_len": Range(2),
    "max_len": Range(4), "eval_every": AT_LEAST_1, "eval_samples": AT_LEAST_1, "save_every": AT_LEAST_1,
    "log_every": AT_LEAST_1, "max_train_examples": AT_LEAST_1, "shuffle_window": AT_LEAST_1,
    "seed": Range(0, 2**32, high_open=True), "smooth": AT_LEAST_1,
    "top_bigrams": AT_LEAST_0, "top_trigrams": AT_LEAST_0, "max_items_in_memory": AT_LEAST_0,
    "min_count": AT_LEAST_1, "exit_threshold": AT_LEAST_0, "exit_gate": Range(0, 1, low_open=True),
    "latency_samples": AT_LEAST_1, "limit": AT_LEAST_1,
    "port": Range(1, 65535), "max_wait_ms": AT_LEAST_0, "max_request_sources": AT_LEAST_1,
    "resamples": AT_LEAST_1,
}


def check_options(args: argparse.Namespace, json_fields: bool = False) -> None:
    """Refuse a numeric option out of range before any work, naming the option as it was typed: a flag, or
    with ``json_fields`` the field of a JSON request (``erniegen serve``)."""
    def name(dest: str) -> str:
        return dest if json_fields else f"--{dest.replace('_', '-')}"
    for dest, value in vars(args).items():
        if dest in OPTION_RANGES and value is not None and value not in OPTION_RANGES[dest]:
            raise ValueError(f"{name(dest)} must be {OPTION_RANGES[dest]}, got {value}")
    low, high = getattr(args, "min_length", None), getattr(args, "max_length", None)
    if low is not None and high is not None and low > high:
        raise ValueError(f"{name('min_length')} {low} exceeds {name('max_length')} {high}")


def _add_generation(p: argparse.ArgumentParser) -> None:
    """What ``generate`` and ``distill`` share: both decode every row of INPUT into OUTPUT, resumably."""
    p.add_argument("--model", required=True)
    p.add_argument("--input", required=True,
                   help="rows to decode: a jsonl, csv or tsv file or a datasets name, or several comma-separated "
                        "(read in turn; OUTPUT keeps their order)")
    p.add_argument("--output", required=True)
    _add_fields(p)
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from OUTPUT.partial (same model, input and options)")
    _add_decoding(p)
    p.set_defaults(func=cmd_generate)


def _add_fields(p: argparse.ArgumentParser, target: bool = True) -> None:
    p.add_argument("--source-field", help="default: the model's task preset's (xsum: document), else source")
    if target:
        p.add_argument("--target-field", help="default: the model's task preset's (xsum: summary), else target")


def _fields(args: argparse.Namespace, models: Sequence[str]) -> tuple[Fields, Fields]:
    """The fields to read: the flags, else the names of the task each model was fine-tuned for (then the
    generic source/target), so a model trained with ``--task xsum`` on the Hub layout reads that layout."""
    from .data import get_task
    from .network import GenerationSettings, read_settings

    def settings(model: str) -> GenerationSettings:
        try:
            return read_settings(model)
        except OSError:  # loading the model says what is wrong, after the input is checked
            return GenerationSettings()
    presets = [get_task(settings(m).task) for m in models]
    source = tuple(dict.fromkeys(n for p in presets for n in p.fields()[0]))
    target = tuple(dict.fromkeys(n for p in presets for n in p.fields()[1]))
    return args.source_field or source, getattr(args, "target_field", None) or target


def _names(fields: Fields) -> str:
    return " or ".join(f"'{n}'" for n in ((fields,) if isinstance(fields, str) else fields))


def _add_decoding(p: argparse.ArgumentParser) -> None:
    from . import registry
    from .runtimes import RUNTIMES
    from .precision import PRECISIONS
    g = p.add_argument_group("decoding (defaults: the task preset saved with the model)")
    g.add_argument("--decoder", default=None, choices=list(registry.DECODERS),
                   help=f"{' | '.join(registry.DECODERS)} (default: the training method's)")
    g.add_argument("--num-beams", type=int, default=None)
    g.add_argument("--max-length", type=int, default=None, help="maximum generated tokens, end token included")
    g.add_argument("--min-length", type=int, default=None)
    g.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha: score / ((5+len)/6)^alpha")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None)
    g.add_argument("--max-token-run", type=int, default=None,
                   help="longest run of one token an output may hold (autoregressive decoders; 0: any)")
    g.add_argument("--block-repeated-words", action=argparse.BooleanOptionalAction, default=None,
                   help="no word or word piece twice in a row, as in 'when did there there' or '##yna ##yna' "
                        "(autoregressive decoders never choose it; NAR and ELMER decoders drop the second; a word or piece: "
                        "a token whose letters, after a piece's ##, number two or more and start with a letter; "
                        "default: the model's task's)")
    g.add_argument("--iterations", type=int, default=None, help="NAR refinement iterations")
    g.add_argument("--length-beam", type=int, default=None, help="NAR: candidate lengths decoded in parallel")
    g.add_argument("--dedup", action="store_true", default=None,
                   help="NAR and ELMER post-processing: drop consecutive duplicate tokens (changes scores; "
                        "reported apart)")
    g.add_argument("--exit-threshold", type=float, default=None,
                   help="ELMER hard exit: a slot exits once its prediction entropy (nats) is below this "
                        "(default: the model's, 0.5 (the paper's) or 0 (the plain pass) for a model trained "
                        "with exits: last, whose lower off-ramps are untrained)")
    g.add_argument("--exit-gate", type=float, default=None,
                   help="ELMER hard exit by the exit gate fitted with `erniegen exit-gate` instead of the entropy "
                        "rule: a slot exits once the gate's probability that its prediction is already the last "
                        "layer's is at least this (0.9: fewer early exits than 0.5, and fewer changed words)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="inference weights: fp32, bf16, or int8 (dynamic quantization of every linear layer and "
                        "of the vocabulary projection; applied on load, the checkpoint stays fp32)")
    g.add_argument("--runtime", default="torch", choices=RUNTIMES,
                   help="what runs the infilling decode step: torch (eager), onnx (ONNX Runtime, exported on load; "
                        "fp32 only; needs pip install \"erniegen[onnx]\"), or compile (torch.compile on first use, "
                        "~0.5-1.5 min; every precision; about half the eager step's time); onnx and compile run the "
                        "infilling decoder only, greedy or beam")


def _check_runtime(args) -> None:
    """Refuse --runtime onnx with a precision or decoder it cannot run, or without ONNX Runtime, before any work.
    (A model whose own decoder is not infilling is refused when it loads, before the export.)"""
    from .onnx_runtime import import_onnxruntime
    from .runtimes import check_runtime
    if check_runtime(args.runtime, args.precision, args.decoder) == "onnx":
        try:
            import_onnxruntime()
        except ImportError as e:
            raise ValueError(str(e)) from None


def _decode_options(args) -> dict:
    from .search import DecodeOptions
    return {k: getattr(args, k) for k in DecodeOptions.USER_SET if getattr(args, k, None) is not None}


# sysexits.h EX_TEMPFAIL: the run stopped at --max-time with its work saved; the same command with
# --resume goes on (schedulers and scripts can tell it from success, 0, and from an error, 2)
EXIT_STOPPED = 75


def _wall_times(args) -> dict[str, float | None]:
    """``--max-time`` and ``--time-budget`` in seconds, as TrainConfig's max_time and time_budget."""
    from .train import parse_duration
    times = {}
    for dest in ("max_time", "time_budget"):
        try:
            times[dest] = None if getattr(args, dest) is None else parse_duration(getattr(args, dest))
        except ValueError as e:
            raise ValueError(f"--{dest.replace('_', '-')}: {e}") from None
    return times


def _report(summary: dict) -> None:
    """Print the run's summary (rank 0); a run stopped by --max-time says so and exits EXIT_STOPPED."""
    from .train import is_main_process
    if is_main_process():
        print(json.dumps(summary, default=str))
    if summary.get("stopped"):
        if is_main_process() and "preparing" in summary:
            print(f"stopped by --max-time during the {summary['preparing']} before fine-tuning, after step "
                  f"{summary['step']} of {summary['steps']}: its state is saved in {summary['state']}; run the "
                  "same command with --resume to go on", file=sys.stderr)
        elif is_main_process():
            print(f"stopped by --max-time after step {summary['global_step']} of {summary['total_steps']}: "
                  "checkpoint-last is saved; run the same command with --resume to go on", file=sys.stderr)
        raise SystemExit(EXIT_STOPPED)


def _add_wall_times(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-time", metavar="[[DD:]HH:]MM:SS",
                   help="wall-time limit for the whole command: after the first optimizer step that ends past "
                        f"it, save checkpoint-last and exit with status {EXIT_STOPPED}; --resume goes on")
    p.add_argument("--time-budget", metavar="[[DD:]HH:]MM:SS",
                   help="wall time the whole command should take: every 10 steps, and after each evaluation, fit "
                        "the number of steps (at most the planned epochs/--max-steps) to the measured step and "
                        "evaluation times, the lr schedule with it, so the run ends finished by then")


def _method_option(text: str) -> str:
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def method_options_of(args) -> dict:
    """``--config``'s method_options, then each ``--method-option KEY=VALUE`` (a YAML value) over them."""
    import yaml
    options = {}
    if args.config:
        with open(args.config, encoding="utf-8") as f:
            options = yaml.safe_load(f) or {}
    merged = dict(options.get("method_options") or {})
    for item in args.method_option:  # KEY=VALUE, checked by _method_option when parsed
        key, value = item.split("=", 1)
        merged[key.strip()] = yaml.safe_load(value)
    return merged


def cmd_finetune(args) -> None:
    from .finetune import FinetuneConfig, finetune
    from .train import TrainConfig
    trainer = TrainConfig(output_dir=args.output, epochs=args.epochs, max_steps=args.max_steps,
                          batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                          warmup_ratio=args.warmup_ratio, seed=args.seed, eval_every=args.eval_every,
                          save_every=args.save_every, log_every=args.log_every, precision=args.precision,
                          resume=args.resume, eval_raw_weights=args.eval_raw_weights, **_wall_times(args))
    cfg = FinetuneConfig(train=args.train, dev=args.dev, output=args.output, model=args.model, task=args.task,
                         method=args.method, noise_rate=args.noise_rate, noise_ramp=args.noise_ramp,
                         label_smoothing=args.label_smoothing,
                         head_warmup_steps=args.head_warmup_steps, adapt_steps=args.adapt_steps,
                         max_source_len=args.max_source_len,
                         max_target_len=args.max_target_len, source_field=args.source_field,
                         target_field=args.target_field, eval_samples=args.eval_samples,
                         max_train_examples=args.max_train_examples, skip_empty_rows=args.skip_empty_rows,
                         trainer=trainer,
                         attention_dropout=args.attention_dropout, hidden_dropout=args.dropout,
                         freeze_embeddings=args.freeze_embeddings, ema_decay=args.ema_decay,
                         answer_marker=args.answer_marker, copy=args.copy,
                         method_options=method_options_of(args))
    _report(finetune(cfg))


def cmd_generate(args) -> None:
    """``generate`` and ``distill``: check options, output, input and resume state first; then decode, saving
    every batch to OUTPUT.partial; the two differ only in the rows written at the end."""
    _check_runtime(args)
    from .data import read_examples, split_specs
    from .decoding import iter_generate_text
    from .model import resolve_model_path
    from .outputs import (PartialPredictions, check_output_path, distilled_row, file_digests, input_digests,
                          output_format)
    from . import load
    fmt = output_format(args.output)
    parts = split_specs(args.input)
    check_output_path(args.output, parts)
    source_field, target_field = _fields(args, [args.model])
    examples = read_examples(args.input, source_field, target_field, require_target=False)
    model_dir = resolve_model_path(args.model).resolve()
    # what fixes the predictions: a resume with anything else would mix two runs in one file
    settings = {"input": input_digests(parts), "rows": len(examples),
                "source_field": args.source_field,
                "model_files": file_digests(sorted(model_dir.iterdir())),
                "decoder": args.decoder, "batch_size": args.batch_size, "options": _decode_options(args),
                "precision": args.precision, "runtime": args.runtime}
    partial = PartialPredictions(args.output, settings, len(examples))
    done = partial.start(args.resume)
    if done:
        print(f"resuming {partial.path}: {len(done)} of {len(examples)} rows already decoded", file=sys.stderr)
    model = load(str(model_dir), precision=args.precision, runtime=args.runtime)
    partial.open()
    for rows, preds in iter_generate_text(model, [e.source for e in examples], args.decoder, args.batch_size,
                                          progress=True, skip=done, **_decode_options(args)):
        partial.append(rows, preds)
    if args.command == "distill":
        blank = [e.where for i, e in enumerate(examples) if not partial.done[i].strip()]
        partial.finish(args.output, fmt, examples, lambda e, text: distilled_row(e, text, target_field))
        print(f"wrote {len(examples)} rows with the teacher's output as {_names(target_field)} to {args.output}",
              file=sys.stderr)
        if blank:
            print(f"note: the teacher wrote nothing for {len(blank)} rows (first: {blank[0]}); they keep their "
                  f"reference as the target, or have none", file=sys.stderr)
        return
    partial.finish(args.output, fmt, examples)
    print(f"wrote {len(examples)} predictions to {args.output}", file=sys.stderr)
    unscorable = sum(e.target is None for e in examples)
    if unscorable:
        print(f"note: {unscorable} of {len(examples)} rows have no {_names(target_field)} field, so "
              f"`erniegen evaluate` cannot score {args.output}", file=sys.stderr)


def cmd_evaluate(args) -> None:
    from .data import DataError, get_task, read_examples
    from .metrics import compute_metrics
    from .network import read_settings
    if args.task is None and args.model is None:
        print("note: scored with the squad_qg preset's metric (BLEU-4 / METEOR / ROUGE-L); pass --model or --task "
              "for another task's", file=sys.stderr)
    preset = get_task(args.task or (read_settings(args.model).task if args.model else "squad_qg"))
    sources, targets = preset.fields()

    def predictions(path: str) -> tuple[list, list[str]]:
        rows = read_examples(path, args.source_field or sources, targets)
        for e in rows:
            if not isinstance(e.row.get("prediction"), str):
                file, _, line = e.where.rpartition(":")
                raise DataError(file, "is missing or not a string", int(line) if line.isdigit() else None,
                                "prediction")
        return rows, [e.row["prediction"] for e in rows]

    rows, preds = predictions(args.predictions)
    refs, srcs = [e.target for e in rows], [e.source for e in rows]
    scores = compute_metrics(preset.metric, preds, refs, srcs)
    result = {"task": preset.name, "n": len(rows)} | scores
    if args.baseline:
        base_rows, base_preds = predictions(args.baseline)
        _check_same_rows(args.baseline, base_rows, rows)
        from .metrics import paired_bootstrap
        compared = paired_bootstrap(preset.metric, base_preds, preds, refs, srcs, args.resamples, args.seed)
        result |= {"baseline": compute_metrics(preset.metric, base_preds, refs, srcs),
                   "paired_bootstrap": {"resamples": args.resamples, "seed": args.seed} | compared}
        for key, c in compared.items():
            print(f"{key}: {c['candidate']:.2f} against the baseline's {c['baseline']:.2f}: {c['delta']:+.2f} "
                  f"(95% interval {c['low']:+.2f} to {c['high']:+.2f}; not better in {100 * c['not_better']:.1f}% "
                  f"of {args.resamples} paired resamples)", file=sys.stderr)
    print(json.dumps(result))


def _check_same_rows(path: str, rows: list, reference_rows: list) -> None:
    """A baseline file must hold the same sources and references, in the same order, as the file it is compared with."""
    from .data import DataError
    if len(rows) != len(reference_rows):
        raise DataError(path, f"holds {len(rows)} rows, the predictions {len(reference_rows)}; a paired comparison "
                              "needs the same rows")
    for e, ref in zip(rows, reference_rows):
        for field, mine, theirs in (("source", e.source, ref.source), ("target", e.target, ref.target)):
            if mine != theirs:
                file, _, line = e.where.rpartition(":")
                raise DataError(file, f"differs from {ref.where}'s; a paired comparison needs the same rows in the "
                                      "same order", int(line) if line.isdigit() else None, field)


def cmd_bench(args) -> None:
    from .bench import bench_decoder, bench_hf_baseline, hf_gpt2_like
    from .data import read_examples
    from .decoding import encode_sources
    from .registry import default_decoder
    from .search import options_from_settings
    from . import load
    import torch
    _check_runtime(args)
    torch.manual_seed(0)
    model = load(args.model, precision=args.precision, runtime=args.runtime)
    examples = read_examples(args.input, *_fields(args, [args.model]), require_target=False)
    need = args.num_samples + 2 * args.batch_size
    sources = encode_sources(model, [e.source for e in examples][:need])
    opts = options_from_settings(model, **_decode_options(args))
    if args.fixed_length:
        opts.max_length = opts.min_length = args.fixed_length
    decoder = args.decoder or default_decoder(model.settings.method)
    timed = sources[2 * args.batch_size:][: args.num_samples]
    warm = sources[: 2 * args.batch_size]
    result = bench_decoder(model, warm + timed, decoder, opts, args.batch_size,
                           warmup=len(warm) // args.batch_size)
    result |= {"precision": args.precision, "runtime": args.runtime, "threads": torch.get_num_threads()}
    if args.hf_baseline:
        base = bench_hf_baseline(hf_gpt2_like(model), warm + timed, opts, args.batch_size,
                                 warmup=len(warm) // args.batch_size)
        result = {"erniegen": result, "baseline": base}
    print(json.dumps(result))


def _choice_options(ns: argparse.Namespace) -> dict:
    """A ``tradeoff`` choice's flags checked as ``generate`` checks its own; its decoding options."""
    check_options(ns)
    _check_runtime(ns)
    return _decode_options(ns)


def cmd_tradeoff(args) -> None:
    from .data import split_specs
    from .outputs import check_output_path
    from .tradeoff import parse_choice, run_tradeoff
    choices = [parse_choice(text, _add_decoding, _choice_options) for text in args.choice]
    parts = split_specs(args.input)
    check_output_path(args.output, parts)
    if args.plot:
        from .plots import check_image_path
        check_output_path(args.plot, [*parts, args.output], "--plot")
        check_image_path(args.plot)
    source_field, target_field = _fields(args, [c.model for c in choices])
    run_tradeoff(choices, args.input, args.output, args.plot, args.latency_samples, args.limit, source_field,
                 target_field, args.predictions)


def cmd_serve(args) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise ValueError("erniegen serve needs FastAPI and uvicorn: pip install 'erniegen[serve]'") from None
    from .registry import default_decoder
    from .serve import create_app, run_server
    from . import load
    _check_runtime(args)
    model = load(args.model, precision=args.precision, runtime=args.runtime)
    decoder = args.decoder or default_decoder(model.settings.method)

    def check(options: dict) -> None:
        check_options(argparse.Namespace(**options), json_fields=True)

    app = create_app(model, decoder, _decode_options(args), check, args.batch_size, args.max_wait_ms,
                     args.max_request_sources)
    run_server(app, args.host, args.port)


def cmd_calibrate(args) -> None:
    from .data import read_examples
    from .finetune import write_int8_calibration
    from .model import resolve_model_path
    folder = resolve_model_path(args.model)
    if not os.access(folder, os.W_OK):
        sys.exit(f"error: {folder} is not writable; the calibration is saved beside the model's weights")
    examples = read_examples(args.input, _fields(args, [args.model])[0], require_target=False)
    write_int8_calibration(str(folder), [e.source for e in examples], args.num_samples)


def cmd_exit_gate(args) -> None:
    import time

    from .data import evenly_spaced, read_examples
    from .decoding import encode_sources
    from .elmer import GATE, fit_exit_gate
    from .model import Transformer, resolve_model_path
    folder = resolve_model_path(args.model)
    if not os.access(folder, os.W_OK):
        sys.exit(f"error: {folder} is not writable; the exit gate is saved beside the model's weights")
    examples = read_examples(args.input, _fields(args, [args.model])[0], require_target=False)
    t0 = time.monotonic()
    model = Transformer.from_pretrained(str(folder)).eval()
    sources = encode_sources(model, [e.source for e in evenly_spaced(examples, args.num_samples)])
    stats = fit_exit_gate(model, sources, args.batch_size, progress=True)
    file = model.save_side_extra(folder, GATE)
    print("layer  agree (fit)  agree (held out)  leave@0.5 (agree)  leave@0.9 (agree)")
    for r in stats:
        print(f"{r['layer']:5d}  {r['agree']:11.1%}  {r.get('held_out_agree', float('nan')):16.1%}  "
              f"{r.get('leave@0.5', float('nan')):8.1%} ({r.get('agree_when_leaving@0.5', float('nan')):.1%})  "
              f"{r.get('leave@0.9', float('nan')):8.1%} ({r.get('agree_when_leaving@0.9', float('nan')):.1%})")
    print(f"exit gate fitted on {len(sources)} sources, written to {file} ({time.monotonic() - t0:.0f} s); decode "
          f"with `erniegen generate --model {args.model} --exit-gate 0.9 …`", file=sys.stderr)


def cmd_span_vocab(args) -> None:
    from .data import split_specs
    from .outputs import check_output_path
    from .spans import span_vocab_main
    check_output_path(args.output, split_specs(args.corpus))
    span_vocab_main(**{k: v for k, v in vars(args).items() if k not in ("func", "command")})


def cmd_pretrain(args) -> None:
    import dataclasses

    from .pretrain import PretrainConfig, default_trainer, pretrain
    trainer = dataclasses.replace(
        default_trainer(), max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_steps=args.warmup_steps, save_every=args.save_every, log_every=args.log_every,
        precision=args.precision, fsdp=args.fsdp, resume=args.resume, seed=args.seed, **_wall_times(args))
    cfg = PretrainConfig(model=args.model, corpus=args.corpus, output=args.output, span_vocab=args.span_vocab,
                         objective=args.objective, lplm_exits=args.lplm_exits, method=args.method,
                         word_weight=args.word_weight,
                         noise_rate=args.noise_rate, max_len=args.max_len, text_field=args.text_field,
                         paragraphs=args.paragraphs, head_warmup_steps=args.head_warmup_steps,
                         shuffle_window=args.shuffle_window, trainer=trainer)
    _report(pretrain(cfg))


def cmd_plot(args) -> None:
    from .plots import plot_runs
    plot_runs(args.runs, args.output, window=args.smooth, labels=args.labels.split(",") if args.labels else None,
              series=args.series.split(",") if args.series else None)
    print(f"wrote {args.output}")


def build_parser() -> argparse.ArgumentParser:
    from . import registry
    p = argparse.ArgumentParser(prog="erniegen", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("finetune", help="fine-tune a BERT-family checkpoint as a generator")
    f.add_argument("--model", default="minilm", help="local folder, alias (minilm) or Hub name")
    f.add_argument("--train", required=True,
                   help="training pairs: a JSONL/CSV/TSV file or datasets name, or several comma-separated, "
                        "read in turn and mixed into every epoch (e.g. a related task's pairs beside the task's)")
    f.add_argument("--dev", help="dev pairs for evaluations and checkpoint choice (comma-separated: several)")
    f.add_argument("--task", default="squad_qg")
    f.add_argument("--output", required=True)
    f.add_argument("--method", default="ernie-gen", choices=list(registry.METHODS), help=registry.method_help())
    f.add_argument("--epochs", type=int, help="default: the task preset's")
    f.add_argument("--max-steps", type=int)
    f.add_argument("--batch-size", type=int, default=32)
    f.add_argument("--grad-accum", type=int, default=1)
    f.add_argument("--lr", type=float, help="peak learning rate; default: the task preset's")
    f.add_argument("--warmup-ratio", type=float, default=0.1)
    f.add_argument("--noise-rate", type=float, help="ρ_f; default: the task preset's (squad_qg 0.2)")
    f.add_argument("--noise-ramp", type=float,
                   help="fraction of the run over which ρ rises linearly from 0 to ρ_f (0: ρ_f from the start); "
                        "default: the task preset's")
    f.add_argument("--label-smoothing", type=float,
                   help="ε of the training cross-entropy; default: the method's (0 for ELMER, whose hard exit "
                        "compares entropies with δ), else the task preset's (0.1)")
    f.add_argument("--head-warmup-steps", type=int,
                   help="masked-LM steps that train a missing LM head before fine-tuning (default: 300 when "
                        "the checkpoint has no head, else 0)")
    f.add_argument("--adapt-steps", type=int,
                   help="task-adaptive pre-training: masked-LM steps over the training sources and questions that "
                        "train the whole model before fine-tuning (default: the task preset's for a checkpoint "
                        "erniegen never trained, else 0)")
    f.add_argument("--max-source-len", type=int)
    f.add_argument("--max-target-len", type=int,
                   help="target tokens kept, end included (default: the task preset's; for --method elmer, "
                        "the slot count T, the longest training target)")
    f.add_argument("--source-field", help="default: the task preset's (xsum: document), else source")
    f.add_argument("--target-field", help="default: the task preset's (xsum: summary), else target")
    f.add_argument("--eval-every", type=int, help="optimizer steps between dev evaluations (default: each epoch)")
    f.add_argument("--eval-samples", type=int, default=300,
                   help="dev examples decoded per evaluation, evenly spaced over the dev file")
    f.add_argument("--save-every", type=int)
    f.add_argument("--log-every", type=int, default=10)
    f.add_argument("--max-train-examples", type=int)
    f.add_argument("--skip-empty-rows", action="store_true",
                   help="leave out training and dev rows whose source or target is empty or null (each named in "
                        "a note) instead of stopping at the first; XSum has empty documents")
    f.add_argument("--attention-dropout", type=float,
                   help="attention-probability dropout (default: the checkpoint's on GPU, 0 on CPU, where it "
                        "doubles step time and memory)")
    f.add_argument("--dropout", type=float, help="hidden-state dropout; default: the task preset's, else the "
                                                 "checkpoint's")
    f.add_argument("--freeze-embeddings", action=argparse.BooleanOptionalAction,
                   help="keep the word embeddings (tied to the output layer) fixed; default: the task preset's")
    f.add_argument("--answer-marker", metavar="TOKEN",
                   help="put this vocabulary token (e.g. '[unused1]') before and after the answer's first "
                        "occurrence in the passage of 'passage [SEP] answer' sources; 'none' for no marker; "
                        "default: the task preset's. The model stores it, so generate marks its inputs alike")
    f.add_argument("--copy", action=argparse.BooleanOptionalAction,
                   help="copy words from the source (a pointer-generator; ERNIE-GEN and typical only); default: "
                        "the task preset's (squad_qg copies). Same as method_options copy")
    f.add_argument("--ema-decay", type=float,
                   help="evaluate and keep an exponential moving average of the weights with this decay "
                        "(0: the raw weights); default: the task preset's")
    f.add_argument("--eval-raw-weights", action="store_true",
                   help="with a moving average: also evaluate the raw weights at each evaluation (eval_raw in "
                        "log.jsonl), to see what the average buys")
    f.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    f.add_argument("--seed", type=int, default=42)
    f.add_argument("--config", help="YAML with method_options (e.g. MIST's mixing switches)")
    f.add_argument("--method-option", action="append", default=[], type=_method_option, metavar="KEY=VALUE",
                   help="one method option (a YAML value), over --config's: e.g. --method-option mixing=static "
                        "--method-option pseudo_from=runs/qg-nat/best; repeat for more")
    f.add_argument("--resume", action="store_true", help="continue exactly from OUTPUT/checkpoint-last")
    _add_wall_times(f)
    f.set_defaults(func=cmd_finetune)

    _add_generation(sub.add_parser("generate", help="write each input row back with a 'prediction' field"))

    d = sub.add_parser(
        "distill", help="write each input row back with a teacher's output as its target",
        description="Sequence-level knowledge distillation (Kim & Rush 2016; Gu et al. 2018 for non-autoregressive "
                    "models): a trained model (typically autoregressive: --decoder infilling) decodes every "
                    "source of INPUT, and each row is written back with that output as TARGET_FIELD, its "
                    "reference moved to 'reference'. Fine-tune a student on OUTPUT with --train; keep the human "
                    "references for --dev. Rows without a target are welcome (unlabelled sources).")
    _add_generation(d)

    e = sub.add_parser("evaluate", help="score a predictions file against its 'target' field")
    e.add_argument("--task", help="the preset whose metric scores the file (default: --model's task, else squad_qg)")
    e.add_argument("--model", help="the model that wrote the predictions: score with its task's metric")
    e.add_argument("--predictions", required=True)
    e.add_argument("--source-field")
    e.add_argument("--baseline", metavar="PREDICTIONS",
                   help="another predictions file of the same rows: also print its scores and the difference with "
                        "a 95%% interval from paired bootstrap resampling (BLEU-4 and ROUGE; METEOR not resampled)")
    e.add_argument("--resamples", type=int, default=1000, help="paired bootstrap resamples (with --baseline)")
    e.add_argument("--seed", type=int, default=0, help="seed of the resampling (with --baseline)")
    e.set_defaults(func=cmd_evaluate)

    b = sub.add_parser("bench", help="decoding latency and throughput as one JSON object")
    b.add_argument("--model", required=True)
    b.add_argument("--input", required=True)
    b.add_argument("--num-samples", type=int, default=64)
    b.add_argument("--fixed-length", type=int, help="force exactly this many generated tokens")
    b.add_argument("--hf-baseline", action="store_true", help="also time a same-size HF GPT-2 generate()")
    _add_fields(b)
    _add_decoding(b)
    b.set_defaults(func=cmd_bench)

    t = sub.add_parser(
        "tradeoff", help="quality beside latency and throughput for each decoding choice, and the Pareto front",
        description="Every --choice (a model and the decoding flags of `erniegen generate`) decodes all rows of "
                    "INPUT at its --batch-size (after one batch of warm-up) and is scored with its model's task "
                    "metric; then its batch-1 latency is timed over the first --latency-samples rows after two "
                    "warm-up rows. Prints a Markdown table, writes OUTPUT (JSON, after every choice) and the "
                    "plot; a choice on the front is one no other beats on both quality and time. Run it on an "
                    "idle machine: every timing shares the cores with whatever else runs.")
    t.add_argument("--input", required=True, help="labelled rows to decode and score (jsonl, csv or tsv): a dev set")
    t.add_argument("--choice", action="append", required=True, metavar="'LABEL=MODEL [FLAGS]'",
                   help="e.g. 'greedy=runs/qg/best --num-beams 1' or 'int8=runs/qg/best --precision int8'; "
                        "repeat for each choice")
    t.add_argument("--output", required=True, help="results as JSON, with the machine, CPU model and date")
    t.add_argument("--plot", help="image of quality against latency and throughput (.png, .svg, .pdf)")
    t.add_argument("--predictions", metavar="DIR",
                   help="also write each choice's predictions here, as DIR/LABEL.jsonl (the input rows with a "
                        "'prediction' field)")
    t.add_argument("--latency-samples", type=int, default=20, help="rows timed one at a time, per choice")
    t.add_argument("--limit", type=int, help="only the first N rows (quick looks; scores then differ from the full set's)")
    _add_fields(t)
    t.set_defaults(func=cmd_tradeoff)

    sv = sub.add_parser(
        "serve", help="serve a model over HTTP (POST /generate, GET /health), batching requests that arrive together",
        description="One thread owns the model and decodes every waiting request with the same options as one "
                    "batch of up to --batch-size sources; requests arriving while a batch decodes form the next. "
                    "The decoding flags are the server's defaults; a request may override them (JSON fields of "
                    "the same names: num_beams, max_length, ...). OpenAPI docs at /docs.")
    sv.add_argument("--model", required=True)
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-wait-ms", type=float, default=0.0,
                    help="hold a request back this long for others to share its batch (0: batch only what is "
                         "already waiting)")
    sv.add_argument("--max-request-sources", type=int, default=256, help="the most sources one request may send")
    _add_decoding(sv)
    sv.set_defaults(func=cmd_serve)

    c = sub.add_parser("calibrate", help="record activation maxima that int8 inference smooths with",
                       description="Decode NUM_SAMPLES sources (evenly spaced over INPUT; training sources are "
                                   "best) with the fp32 model and save each smoothed linear layer's input maxima "
                                   "beside its weights, where `--precision int8` finds them. `erniegen finetune` "
                                   "does this at the end of training; run it for older models.")
    c.add_argument("--model", required=True, help="a model folder (written to)")
    c.add_argument("--input", required=True, help="jsonl with a source field")
    c.add_argument("--num-samples", type=int, default=64)
    _add_fields(c, target=False)
    c.set_defaults(func=cmd_calibrate)

    from .elmer import GATE_SOURCES
    eg = sub.add_parser("exit-gate", help="fit an ELMER hard-exit model's exit gate, a cheaper exit test",
                        description="Decode NUM_SAMPLES sources (evenly spaced over INPUT; training sources: the "
                                    "dev set stays for choosing --exit-gate and scoring) through every layer, and "
                                    "fit for each off-ramp below the last a logistic regression on the slot's "
                                    "state for 'this prediction is already the last layer's' (CALM's early-exit "
                                    "classifier; not in the ELMER paper). Saved beside the model's weights; "
                                    "`--exit-gate P` then exits a slot once that probability is at least P, "
                                    "and only leaving slots pay for the vocabulary projection.")
    eg.add_argument("--model", required=True, help="a model fine-tuned with --method elmer (written to)")
    eg.add_argument("--input", required=True, help="jsonl with a source field")
    eg.add_argument("--num-samples", type=int, default=GATE_SOURCES)
    eg.add_argument("--batch-size", type=int, default=32)
    _add_fields(eg, target=False)
    eg.set_defaults(func=cmd_exit_gate)

    s = sub.add_parser("span-vocab", help="T-test span vocabulary of bigrams/trigrams for the span flow")
    from .spans import add_span_vocab_arguments
    add_span_vocab_arguments(s)
    s.set_defaults(func=cmd_span_vocab)

    pt = sub.add_parser(
        "pretrain", help="ERNIE-GEN (word + span flows, noise) or ELMER LPLM pre-training on a streamed corpus",
        description="ERNIE-GEN pre-training (Xiao et al., 2020, §3), or with --objective lplm ELMER's Layer "
                    "Permutation LM (Li et al., 2022, §3.4). The pre-trained model is written to "
                    "OUTPUT/best at the end (OUTPUT/checkpoint-last holds the latest resumable checkpoint); "
                    "both are Hugging Face model folders: `erniegen finetune --model OUTPUT/best`. "
                    "Tokens per optimizer step <= batch-size x grad-accum x processes x max-len; the paper's "
                    "24,576 = 8 x 6 x 1 x 512 (the defaults) = 8 x 3 x 2 x 512 under two processes. "
                    "Several processes: torchrun --standalone --nproc_per_node=N -m erniegen.cli pretrain ... "
                    "(each rank reads its own shard of the corpus).")
    pt.add_argument("--model", default="minilm", help="BERT-family folder, alias (minilm) or Hub name to start from")
    pt.add_argument("--corpus", required=True, help="text/JSONL file(s), comma-separated, or datasets name[:config]")
    pt.add_argument("--span-vocab", help="TSV from `erniegen span-vocab`; default: build one from the corpus "
                                         "first and save it as OUTPUT/span_vocab.tsv")
    pt.add_argument("--output", required=True, help="run folder: best/, checkpoint-last/, log.jsonl")
    pt.add_argument("--max-steps", type=int, help="optimizer steps (required: a stream has no epochs)")
    pt.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, per process")
    pt.add_argument("--grad-accum", type=int, default=6, help="micro-batches per optimizer step")
    pt.add_argument("--lr", type=float, default=1e-4, help="peak lr (default: BERT's pre-training 1e-4)")
    pt.add_argument("--warmup-steps", type=int, default=4000,
                    help="linear warm-up steps, then linear decay to 0 (paper: 4,000); clamped to --max-steps")
    pt.add_argument("--max-len", type=int, default=512, help="tokens of [CLS] S' [SEP] T [SEP]")
    pt.add_argument("--noise-rate", type=float, default=0.05, help="ρ_p, target noise (paper: 0.05; 0 = ablation)")
    pt.add_argument("--word-weight", type=float, default=None,
                    help="λ in λ·L_word + (1-λ)·L_span (paper: 0.5; 1 = no span flow; typical: 1)")
    pt.add_argument("--objective", default="ernie-gen", choices=["ernie-gen", "lplm"],
                    help="ernie-gen = ERNIE-GEN's word and span flows; lplm = ELMER's Layer Permutation LM "
                         "(sentence shuffling + text infilling, exit layers drawn uniformly; no span vocabulary)")
    pt.add_argument("--lplm-exits", default="drawn", choices=list(registry.elmer.LPLM_EXITS),
                    help="with --objective lplm: drawn = each slot's exit layer uniform over 1..L (ELMER); last = "
                         "every slot at the last layer, the control that tells what the drawn exits add")
    pt.add_argument("--method", default="ernie-gen", choices=list(registry.ERNIE_GEN.methods),
                    help=registry.method_help(registry.ERNIE_GEN.methods))
    pt.add_argument("--head-warmup-steps", type=int,
                    help="masked-LM steps that train a missing LM head over the corpus's first sequences before "
                         "pre-training (default: 300 when the checkpoint has no head, else 0)")
    pt.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    pt.add_argument("--fsdp", action="store_true",
                    help="shard weights, gradients and optimizer state with FSDP instead of DDP "
                         "(torchrun with >= 2 processes; CPU/gloo or GPU/NCCL)")
    pt.add_argument("--resume", action="store_true", help="continue exactly from OUTPUT/checkpoint-last")
    pt.add_argument("--save-every", type=int, default=1000, help="optimizer steps between resumable checkpoints")
    pt.add_argument("--log-every", type=int, default=10)
    pt.add_argument("--text-field", default="text", help="JSONL field holding a document")
    pt.add_argument("--paragraphs", action="store_true", help="text files: blank-line separated documents")
    pt.add_argument("--shuffle-window", type=int, default=10_000,
                    help="shuffle documents within windows of this many, per process (1 = corpus order); "
                         "memory holds one window of text")
    pt.add_argument("--seed", type=int, default=42)
    _add_wall_times(pt)
    pt.set_defaults(func=cmd_pretrain)

    pl = sub.add_parser("plot", help="training-loss and dev-metric curves of runs, side by side, as an image")
    pl.add_argument("runs", nargs="+", help="run folders (or their log.jsonl) from finetune / pretrain")
    pl.add_argument("--output", required=True, help="image file; the format follows the suffix (.png, .svg, .pdf)")
    pl.add_argument("--smooth", type=int, default=1, help="moving average over this many logged points")
    pl.add_argument("--labels", help="comma-separated legend names, one a run (default: the folder names)")
    pl.add_argument("--series", help="comma-separated curves to draw, e.g. loss,dev_loss,bleu4 "
                                     "(default: every loss and dev metric logged)")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from . import allocator
    allocator.keep_freed_memory()  # ~12% of an fp32 training step went to re-faulting freed memory
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        args.func(args)
    except (OSError, ValueError) as e:  # DataError is a ValueError
        from .data import EmptyField
        hint = " (--skip-empty-rows leaves such rows out)" if isinstance(e, EmptyField) and args.command == "finetune" \
            else ""
        print(f"erniegen {args.command}: error: {e}{hint}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
