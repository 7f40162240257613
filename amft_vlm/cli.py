"""The ``amft-vlm`` command line."""

from __future__ import annotations

import argparse
import contextlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.contrib.logging import logging_redirect_tqdm

import environments  # noqa: F401  (registers the environments)
from agents.baselines import BASELINE_AGENTS, baseline_agent
from amft_vlm.evaluation.evaluate import (
    ENV_IDS,
    MODALITIES,
    SETTINGS,
    SPLITS,
    evaluate,
    paper_settings,
    summary_table,
    write_record,
)
from amft_vlm.evaluation.served import (
    DEFAULT_API_KEY_ENV,
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    RetryPolicy,
    ServedEndpoint,
    default_cache_dir,
)
from amft_vlm.rollout.expert_data import collect, read_manifest
from amft_vlm.run.config import TrainConfig, load_values, parse_key_value
from amft_vlm.run.dataset_export import export_dataset
from amft_vlm.run.hub_format import PARQUET_FILE
from amft_vlm.run.jobs import (
    Terminated,
    interrupt_exit_status,
    log_to_file,
    quiet_console,
    sigterm_as_interrupt,
)
from amft_vlm.run.preflight import check_output_file, writable_directory
from amft_vlm.run.run_directory import TRAIN_LOG
from amft_vlm.run.safe_io import load_json_text
from amft_vlm.settings_docs import methods_help, train_help
from environments.general_points.settings import PAPER_EPISODES, PAPER_SETTINGS

log = logging.getLogger("amft_vlm")


AGENT_NAMES = tuple(BASELINE_AGENTS)


def _play_command(args: argparse.Namespace) -> int:
    by_name = paper_settings("GeneralPoints-v0")
    records = []
    for name in args.setting or list(PAPER_SETTINGS):
        setting, modality = by_name[name]
        for agent in args.agent:
            records.append(
                evaluate(
                    env_id="GeneralPoints-v0",
                    setting=setting,
                    modality=modality,
                    split=args.split,
                    episodes=args.episodes,
                    seed=args.seed,
                    agent=baseline_agent(agent, args.seed),
                    env_kwargs={"resolution": args.resolution},
                )
            )
    print(summary_table(records))
    return 0


def parse_env_args(pairs: list[str]) -> dict[str, object]:
    """``--env-arg`` values as gym.make keywords, read like every ``key=value`` (`amft_vlm.run.config.parse_key_value`):
    ``["modality=language", "num_cards=4", "resolution=None"]`` -> ``{"modality": "language", "num_cards": 4, "resolution": None}``."""
    return dict(parse_key_value(pair, what="--env-arg", example="modality=language") for pair in pairs)


def _collect_command(args: argparse.Namespace) -> int:
    env_kwargs = parse_env_args(args.env_arg)
    stats = collect(args.env, env_kwargs, baseline_agent(args.agent, args.seed), episodes=args.episodes, seed=args.seed, out_dir=args.out)
    log.info(
        "wrote %d dialogues from %d episodes to %s (success rate %.1f%%, mean return %.2f)",
        read_manifest(args.out)["dialogues"], stats.episodes, args.out, 100 * stats.success_rate, stats.mean_return,
    )
    return 0


def _export_command(args: argparse.Namespace) -> int:
    rows = export_dataset(args.source, args.out)
    log.info("wrote %d dialogues of %s to %s/%s (datasets.load_dataset reads the directory)", rows, args.source, args.out, PARQUET_FILE)
    return 0


def train_config_file(config_file: str | None, overrides: Sequence[str], *, resume: bool) -> str | Path | None:
    """The config file ``amft-vlm train`` starts from, before its ``key=value`` overrides: ``--config``; or, for
    ``--resume`` without it, the run's own ``OUTPUT_DIR/config.yaml`` (a whole `TrainConfig`, so a run started
    from a config file resumes with its settings) when the output directory named by the overrides (or the
    default one) has it; otherwise None, the built-in defaults."""
    if config_file is not None or not resume:
        return config_file
    output_dir = load_values(None, overrides).get("output_dir", TrainConfig.output_dir)
    saved = Path(str(output_dir)) / "config.yaml"
    if not saved.is_file():
        return None
    log.info("--resume without --config: starting from the run's settings in %s, the overrides on top", saved)
    return saved


def _train_command(args: argparse.Namespace) -> int:
    from amft_vlm.run.config import load_config

    config = load_config(train_config_file(args.config, args.overrides, resume=args.resume), args.overrides)
    log_file = Path(config.output_dir) / TRAIN_LOG
    with contextlib.ExitStack() as console:
        if not args.verbose:  # INFO goes to the run's log file; the console keeps the progress bar and warnings
            console.enter_context(quiet_console())
        trainer, set_up_records = _claim_run_directory(config, args)
        try:
            file_handler = console.enter_context(log_to_file(log_file, prefix=_rank_prefix()))
            for record in set_up_records:
                file_handler.handle(record)
            history = trainer.train()
        finally:
            trainer.close()
    if history:
        last = history[-1]
        print(f"finished step {last['step']}: loss {last['loss']:.4f}, mu {last['mu']:.3f}; metrics in {config.output_dir}/metrics.jsonl, log in {log_file}")
    return 0


def _claim_run_directory(config: TrainConfig, args: argparse.Namespace) -> tuple[Any, list[logging.LogRecord]]:
    """The `Trainer` and the log records of its set-up, kept for the run's log file: that file may only be opened once
    the trainer has claimed its directory (locked it, refused or cleared an old run)."""
    from amft_vlm.learning.trainer import Trainer

    early = logging.handlers.BufferingHandler(capacity=1 << 30)  # flushed by hand, never by size
    logging.getLogger().addHandler(early)
    try:
        trainer = Trainer(config, resume=args.resume, overwrite=args.overwrite)
    finally:
        logging.getLogger().removeHandler(early)
    return trainer, early.buffer


def _rank_prefix() -> str:
    """``"rank R "`` for the lines a process of a several-process run appends to the shared log file, else nothing."""
    return f"rank {os.environ.get('RANK', '0')} " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""


def _report_command(args: argparse.Namespace) -> int:
    from amft_vlm.evaluation.report import FIGURES, write_report

    writable_directory(args.out, what="--out", create=False)  # made by write_report once the runs are read
    report = write_report(args.run_dirs, args.out, eval_files=args.eval)
    print(f"wrote {report}")
    for figure in FIGURES:
        plot = report.parent / f"{figure.name}.png"
        if plot.is_file():
            print(f"wrote {plot}")
    return 0


def _demo_command(args: argparse.Namespace) -> int:
    from amft_vlm.demo import load_demo_config, run_demo

    config = load_demo_config(args.config, args.overrides, quick=args.quick, steps=args.steps)
    result = run_demo(args.out, config, threads=args.threads, force=args.force)
    print(result.table)
    return 0


def _compare_command(args: argparse.Namespace) -> int:
    from amft_vlm.compare import load_compare_config, parse_methods, parse_seeds, run_compare

    config = load_compare_config(
        args.config,
        args.overrides,
        methods=parse_methods(args.methods) if args.methods is not None else None,
        seeds=parse_seeds(args.seeds) if args.seeds is not None else None,
        jobs=args.jobs,
        threads=args.threads,
    )
    if args.dry_run:
        from amft_vlm.compare import plan_text

        print(plan_text(config, config.default_out() if args.out is None else args.out))
        return 0
    try:
        result = run_compare(config, args.out)
    except KeyboardInterrupt:
        log.warning("interrupted; finished runs, their checkpoints and current records are kept: rerun the same command to resume")
        raise
    print(result.table)
    return 0


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {value}")
    return value


SERVED_ONLY_OPTIONS = (
    "api_key_env", "concurrency", "request_timeout", "max_attempts", "retry_base_delay", "retry_max_delay", "cache_dir", "cache_tag",
    "no_cache", "min_pixels", "max_pixels", "extra_body",
)
"""``eval`` options (argparse names) that apply only with ``--api-base``."""

LOCAL_ONLY_OPTIONS = ("num_envs", "dtype", "device")
"""``eval`` options that apply only to a local model."""


def served_endpoint(args: argparse.Namespace) -> ServedEndpoint | None:
    """The served model ``eval``'s options describe (None without ``--api-base``); refuses options that do not apply."""
    if args.api_base is None:
        given = [name for name in SERVED_ONLY_OPTIONS if getattr(args, name) not in (None, False)]
        if given:
            raise ValueError(f"{_option_list(given)} {'applies' if len(given) == 1 else 'apply'} to a served model; add --api-base URL")
        return None
    if args.agent is not None:
        raise ValueError("--api-base serves a model; a model-free agent (--agent) needs none: leave out one of them")
    given = [name for name in LOCAL_ONLY_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ValueError(
            f"{_option_list(given)} {'applies' if len(given) == 1 else 'apply'} to a local model, not a served one; use --concurrency"
        )
    cache_dir = None if args.no_cache else args.cache_dir or str(default_cache_dir())
    return ServedEndpoint(
        api_base=args.api_base,
        model=args.model,
        api_key_env=args.api_key_env or DEFAULT_API_KEY_ENV,
        concurrency=args.concurrency or 8,
        request_timeout=args.request_timeout or 120.0,
        retry=RetryPolicy(
            max_attempts=args.max_attempts or 6,
            base_delay=1.0 if args.retry_base_delay is None else args.retry_base_delay,
            max_delay=60.0 if args.retry_max_delay is None else args.retry_max_delay,
        ),
        cache_dir=cache_dir,
        cache_tag=args.cache_tag,
        min_pixels=args.min_pixels or QWEN_MIN_PIXELS,
        max_pixels=args.max_pixels or QWEN_MAX_PIXELS,
    )


def _option_list(names: list[str]) -> str:
    """Argparse names as the options a user types: ``--cache-dir, --no-cache``."""
    return ", ".join("--" + name.replace("_", "-") for name in names)


def _positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive number; got {text!r}")
    return value


def _clipped(text: str, limit: int = 80) -> str:
    """`text` for a message: quoted, and cut to `limit` characters (with how long it was)."""
    return repr(text) if len(text) <= limit else f"{text[:limit]!r}... ({len(text)} characters)"


def _json_object(text: str) -> dict[str, object]:
    """An argparse type: a JSON object, e.g. ``{"top_k": 20}``."""
    try:
        value = load_json_text(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"top_k\": 20}}'; got {_clipped(text)} ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"top_k\": 20}}'; got {_clipped(text)}")
    return value


def _non_negative_float(text: str) -> float:
    """An argparse type: a finite number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number of at least 0; got {text!r}")
    return value


def _eval_command(args: argparse.Namespace) -> int:
    if args.out:
        check_output_file(args.out, what="--out")  # before the evaluation, not after it
    served = served_endpoint(args)
    try:
        record = evaluate(
            env_id=args.env,
            setting=args.setting,
            modality=args.modality,
            split=args.split,
            episodes=args.episodes,
            seed=args.seed,
            agent=baseline_agent(args.agent, args.seed) if args.agent else None,
            model=args.model if served is None else None,
            served=served,
            env_kwargs=parse_env_args(args.env_arg),
            num_envs=args.num_envs or 8,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            extra_body=args.extra_body,
            dtype=args.dtype or "float32",
            device=args.device or "auto",
        )
    except KeyboardInterrupt:
        if served is not None and served.cache_dir is None:
            log.warning("interrupted; with --no-cache nothing was kept: a rerun asks for every answer again")
        elif served is not None:
            log.warning("interrupted; every answered turn is in the cache %s: rerun the same command to resume", served.cache_dir)
        raise
    if args.out:
        write_record(record, args.out)
        log.info("wrote the evaluation record to %s", args.out)
    print(record.to_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``amft-vlm`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="amft-vlm",
        description="Benchmark and train vision-language agents on GeneralPoints-v0 and VIRL-v0.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    play_parser = commands.add_parser(
        "play",
        help="play GeneralPoints with model-free agents over the papers' settings and print success rates",
        description="Play GeneralPoints-v0 with the oracle expert and random baselines over the papers' "
        "settings and print a table of success rates (a check of the environment end to end).",
    )
    play_parser.add_argument("--setting", action="append", choices=list(PAPER_SETTINGS), help="setting to play (repeatable; default: all)")
    play_parser.add_argument(
        "--agent", nargs="+", default=list(AGENT_NAMES), choices=AGENT_NAMES, help="agents to play"
    )
    play_parser.add_argument("--episodes", type=int, default=PAPER_EPISODES, help=f"episodes per setting and agent (default {PAPER_EPISODES}, as the papers)")
    play_parser.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    play_parser.add_argument("--split", default="all", choices=["all", "train", "val", "test"], help="which hands to deal")
    play_parser.add_argument("--resolution", type=int, default=1200, help="card-table image size in vision settings")
    play_parser.set_defaults(handler=_play_command)

    collect_parser = commands.add_parser(
        "collect",
        help="record an agent's dialogues as an expert-trajectory dataset (JSONL + PNG images)",
        description="Play an environment with an agent and write every dialogue to DIR/dialogues.jsonl, "
        "images once per dialogue to DIR/images/, and DIR/manifest.json.",
    )
    collect_parser.add_argument("--env", default="GeneralPoints-v0", help="environment id (default GeneralPoints-v0)")
    collect_parser.add_argument(
        "--env-arg", action="append", default=[], metavar="KEY=VALUE", help="gym.make keyword, e.g. modality=language split=train (repeatable)"
    )
    collect_parser.add_argument("--agent", default="expert", choices=AGENT_NAMES, help="who plays")
    collect_parser.add_argument("--episodes", type=int, default=1000, help="episodes to record")
    collect_parser.add_argument("--seed", type=int, default=0, help="seed of the first episode")
    collect_parser.add_argument("--out", required=True, help="dataset directory to create (must not exist or be empty)")
    collect_parser.set_defaults(handler=_collect_command)

    export_parser = commands.add_parser(
        "export",
        help="write an expert dataset in the Hugging Face datasets format (Parquet with an Image column)",
        description="Write the expert dataset SRC (made by `amft-vlm collect`) to DIR/data/train-00000-of-00001.parquet, "
        "one row per dialogue (chat messages, image, env id and settings, seed, rewards, success), readable by "
        "datasets.load_dataset(DIR) and by `amft-vlm train expert_data=DIR`.",
    )
    export_parser.add_argument("source", metavar="SRC", help="expert dataset directory (made by `amft-vlm collect`)")
    export_parser.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    export_parser.set_defaults(handler=_export_command)

    train_parser = commands.add_parser(
        "train",
        help="train a policy with AMFT or a baseline (config file + key=value overrides)",
        description="Train with the method in the config (method: NAME) and its settings, both listed below.\n"
        "Overrides are key=value, dotted for sections, values read as YAML:\n"
        "  steps=100 controller.eta_mu=0.1 expert_data=null",
        epilog=train_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train_parser.add_argument("--config", help="YAML config file (default: the built-in defaults)")
    start = train_parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume",
        action="store_true",
        help="continue from the run directory's latest checkpoint; without --config the run's own OUTPUT_DIR/config.yaml "
        "is the base the overrides apply to",
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run already in the output directory (metrics.jsonl, checkpoints/, config.yaml, train.log, "
        "the tiny initial-model/; nothing else) and start again; without --resume or this, a run there is refused",
    )
    train_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    train_parser.set_defaults(handler=_train_command)

    eval_parser = commands.add_parser(
        "eval",
        help="evaluate a model or a model-free agent on a paper setting; metrics with standard errors",
        description="Play one setting of the papers (234 GeneralPoints episodes; 48 V-IRL routes, 18 for ood-visual, "
        "unless --episodes) with a model (batched rollouts, greedy unless --temperature), a model served behind an "
        "OpenAI-compatible API (--api-base URL --model NAME: vLLM, SGLang, a hosted API) or a model-free agent. "
        "Episode i is reset with seed S+i. Prints a markdown table; --out writes the JSON record.",
    )
    who = eval_parser.add_mutually_exclusive_group(required=True)
    who.add_argument(
        "--model", metavar="PATH_OR_ID", help="checkpoint directory, Hub id, or tiny:qwen2-vl / tiny:qwen2.5-vl; with --api-base the served model's name"
    )
    who.add_argument("--agent", choices=AGENT_NAMES, help="a model-free agent instead of a model (sanity rows)")
    eval_parser.add_argument("--env", default="GeneralPoints-v0", choices=ENV_IDS, help="environment (default GeneralPoints-v0)")
    eval_parser.add_argument("--setting", default="id", choices=SETTINGS, help="paper setting (default id; ood-visual needs --modality vision)")
    eval_parser.add_argument("--modality", default="language", choices=MODALITIES, help="observation modality (default language)")
    eval_parser.add_argument("--split", choices=SPLITS, help="episodes of this split (default: the environment's, all = the papers' protocol)")
    eval_parser.add_argument("--episodes", type=int, help="episodes to play (default: the papers' 234 for GeneralPoints, 48 or 18 routes for V-IRL)")
    eval_parser.add_argument("--seed", type=int, default=0, help="seed S: episodes use seeds S, S+1, ..., S+N-1; also seeds sampling (default 0)")
    eval_parser.add_argument("--out", metavar="FILE", help="write the JSON evaluation record here")
    eval_parser.add_argument(
        "--env-arg", action="append", default=[], metavar="KEY=VALUE", help="more gym.make keywords, e.g. resolution=448 (repeatable)"
    )
    eval_parser.add_argument("--num-envs", type=_positive_int, help="environments per batched generate call (local model only; default 8)")
    eval_parser.add_argument("--max-new-tokens", type=_positive_int, default=256, help="most tokens per answer (model only; default 256)")
    eval_parser.add_argument("--temperature", type=float, help="sample at this temperature (model only; default: greedy)")
    eval_parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="local model dtype (default float32)")
    eval_parser.add_argument("--device", help="local model device: auto (CUDA when available; the default), cpu, cuda, cuda:1, ...")
    served = eval_parser.add_argument_group(
        "served model",
        "a model behind an OpenAI-compatible chat-completions API (vLLM, SGLang, hosted): the same dialogues, images as PNG "
        "data URLs sized by --min-pixels/--max-pixels, faults retried with backoff, episodes whose retries run out counted "
        "apart as transport failures, answers cached on disk so a rerun pays only for unfinished turns",
    )
    served.add_argument("--api-base", metavar="URL", help="the API's base URL, e.g. http://localhost:8000/v1 (vLLM) or https://api.openai.com/v1")
    served.add_argument("--api-key-env", metavar="VAR", help=f"environment variable holding the API key (default {DEFAULT_API_KEY_ENV}; unset: a placeholder, fine for a local server)")
    served.add_argument(
        "--concurrency", type=_positive_int, metavar="K", help="episodes in flight at once, each with its own environment in "
        "memory (about 50 MB each for V-IRL vision, 20 MB for GeneralPoints vision; default 8)"
    )
    served.add_argument("--request-timeout", type=_positive_float, metavar="S", help="seconds a request may take in all (connecting, sending, reading the whole answer) before it is retried (default 120)")
    served.add_argument("--max-attempts", type=_positive_int, metavar="N", help="requests per turn, retries included, before the episode fails by transport (default 6)")
    served.add_argument("--retry-base-delay", type=_non_negative_float, metavar="S", help="backoff bound of the first retry, doubled each retry, full jitter (default 1)")
    served.add_argument("--retry-max-delay", type=_non_negative_float, metavar="S", help="most seconds of backoff between attempts (default 60; a server's Retry-After is honoured up to 120)")
    served.add_argument("--cache-dir", metavar="DIR", help="response cache directory (default $XDG_CACHE_HOME/amft-vlm/served, i.e. ~/.cache/amft-vlm/served)")
    served.add_argument(
        "--cache-tag", metavar="TEXT", help="a label in every cache key, e.g. the checkpoint served: keeps apart runs the server cannot tell apart "
        "(another checkpoint served at the same URL under the same name, by a server whose GET /models does not say which)"
    )
    served.add_argument("--no-cache", action="store_true", help="neither read nor write the response cache")
    served.add_argument(
        "--extra-body", type=_json_object, metavar="JSON", help="more fields for every request's body, as a JSON object, e.g. "
        "'{\"top_k\": -1}' for a server whose decoding defaults differ from the local path's; sent on top of top_k -1, "
        "repetition_penalty 1 and min_p 0, which a vLLM or SGLang server (GET /models owned_by) gets anyway; recorded and "
        "part of the cache key"
    )
    served.add_argument(
        "--min-pixels", type=_positive_int, metavar="N", help=f"smallest image area after smart resize (default {QWEN_MIN_PIXELS}, Qwen2.5-VL's "
        "image processor's, as a local model; for a checkpoint trained with min_pixels=N, pass the same N)"
    )
    served.add_argument(
        "--max-pixels", type=_positive_int, metavar="N", help=f"largest image area after smart resize (default {QWEN_MAX_PIXELS}, Qwen2.5-VL's "
        "image processor's, as a local model; for a checkpoint trained with max_pixels=N, pass the same N)"
    )
    eval_parser.set_defaults(handler=_eval_command)

    report_parser = commands.add_parser(
        "report",
        help="plot runs' metrics.jsonl (overlaid) and write a markdown summary with the evaluation table",
        description="Read RUN_DIR/metrics.jsonl of each run and write PNG plots (reward and success, loss parts, mu, "
        "entropy and target entropy, controller terms, gradients; runs overlaid) and DIR/report.md with a row per run "
        "and a table of the evaluation records in RUN_DIR/eval/*.json and --eval files.",
    )
    report_parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training output directory (with metrics.jsonl)")
    report_parser.add_argument("--out", required=True, metavar="DIR", help="directory for report.md and the PNGs (created if needed)")
    report_parser.add_argument(
        "--eval", nargs="+", action="extend", default=[], metavar="FILE", help="more evaluation records (JSON) for the table (repeatable)"
    )
    report_parser.set_defaults(handler=_report_command)

    demo_parser = commands.add_parser(
        "demo",
        help="the whole toolkit end to end on a CPU in minutes: tiny Qwen2-VL, expert data, SFT and AMFT, evaluation, report",
        description="Build a tiny Qwen2-VL with a locally trained tokenizer, collect expert dialogues on GeneralPoints "
        "(language, training hands), train SFT and AMFT with the same budget, evaluate both greedily on training hands, "
        "held-out hands and the rule-OOD setting (with expert and random sanity rows), write a report with plots, and "
        "print the table. Nothing is downloaded; about 7 minutes on 2 free CPU cores. Every number is in the config "
        "(configs/demo.yaml); overrides are key=value as for train, e.g. demo.eval_episodes=20 seed=1.",
    )
    demo_parser.add_argument("--config", metavar="FILE", help="demo config (default: the shipped configs/demo.yaml)")
    demo_parser.add_argument("--out", default="runs/demo", metavar="DIR", help="output directory, empty or new (default runs/demo)")
    demo_parser.add_argument("--force", action="store_true", help="replace the demo's files in a non-empty --out directory")
    demo_parser.add_argument("--steps", type=_positive_int, help="optimiser steps of each method, keeping the controller's share (default: the config's)")
    demo_parser.add_argument(
        "--threads", type=_positive_int, help="torch threads (default: the cores other processes leave free, measured from /proc/stat)"
    )
    demo_parser.add_argument("--quick", action="store_true", help="a few steps and episodes: checks that everything runs, learns nothing")
    demo_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, applied after --quick's")
    demo_parser.set_defaults(handler=_demo_command)

    compare_parser = commands.add_parser(
        "compare",
        help="train methods x seeds under the same budget, evaluate each on the paper settings, table and curves",
        description="Train every method x seed with the config's shared settings (OUT/runs/METHOD/seed-S), evaluate each\n"
        "final checkpoint on the paper settings (held-out in distribution, rule OOD, and visual OOD in vision; OUT/eval),\n"
        "and write OUT/compare.md (mean and 95% interval over seeds, the budget each run consumed, steps-to-threshold),\n"
        "OUT/curves.png and OUT/summary.json; prints the table. Run it again to resume: finished runs and current\n"
        "evaluations are kept, unfinished runs continue from their checkpoints. Overrides are key=value as for train:\n"
        "  amft-vlm compare --config configs/compare-tiny-gp-l.yaml --methods amft,sft --seeds 3 --jobs 2 steps=20",
        epilog=methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare_parser.add_argument("--config", metavar="FILE", help="compare config (default: the shipped configs/compare-tiny-gp-l.yaml)")
    compare_parser.add_argument("--methods", metavar="M1,M2", help="methods to compare, comma-separated (default: compare.methods)")
    compare_parser.add_argument("--seeds", metavar="N|S1,S2", help="seeds: a count from the base seed, or a list (default: compare.seeds)")
    compare_parser.add_argument("--jobs", type=_positive_int, help="runs at once, each in its own process (default: compare.jobs)")
    compare_parser.add_argument(
        "--threads", type=_positive_int, help="torch threads in all, shared by the jobs (default: the cores other processes leave free)"
    )
    compare_parser.add_argument("--out", metavar="DIR", help="output directory (default: runs/NAME for config NAME.yaml)")
    compare_parser.add_argument(
        "--dry-run", action="store_true",
        help="check the config, print the grid (methods x seeds x evaluations), the task count, each method's work and an "
        "estimated time, and exit without running or writing anything",
    )  # fmt: skip
    compare_parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    compare_parser.set_defaults(handler=_compare_command)
    return parser


CLEAN_STOP_COMMANDS = ("compare", "demo", "eval")
"""Commands that SIGTERM stops like Ctrl-C (`amft_vlm.run.jobs.sigterm_as_interrupt`): what they started (worker
processes, request threads) is stopped and what they wrote is left resumable. ``train`` keeps SIGTERM's default,
an immediate end (its files are written atomically): under torchrun a process told to stop must not wait at a
barrier for processes already gone."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``amft-vlm`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        for name in ("httpx", "httpx2"):  # the openai client's HTTP layer (httpx; httpx2 from openai 3) logs every request at INFO
            logging.getLogger(name).setLevel(logging.WARNING)
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "episodes", None) is not None and args.episodes < 1:
        parser.error("--episodes must be at least 1")
    stop_on_sigterm = sigterm_as_interrupt() if args.command in CLEAN_STOP_COMMANDS else contextlib.nullcontext()
    try:
        with logging_redirect_tqdm(), stop_on_sigterm:  # log lines go above the progress bars, not into them
            return args.handler(args)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM for CLEAN_STOP_COMMANDS
        if args.verbose:
            raise
        print(f"amft-vlm {args.command}: stopped ({'SIGTERM' if isinstance(interrupt, Terminated) else 'interrupted'})", file=sys.stderr)
        return interrupt_exit_status(interrupt)
    except (ValueError, OSError) as error:  # OSError: FileExistsError, PermissionError, a full disk, ...
        if args.verbose:
            raise
        parser.exit(2, f"amft-vlm {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
