"""`mlmesh predict` and `mlmesh serving`: batch predictions and the choice of served versions.

    mlmesh predict --model NAME [--version N] --source FILE --output PREDICTIONS.parquet
    mlmesh serving status
    mlmesh serving pin NAME VERSION      serve that version until told otherwise (a rollback)
    mlmesh serving rollback NAME         pin the version before the one being served
    mlmesh serving follow NAME           serve the newest version again, and each new one
    mlmesh serving unload NAME           stop serving NAME

Each is one call, or a few, to the serving stage's Open Inference Protocol API:
predictions through ModelInfer, choices through the repository extension.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from services.client.mesh import ConfigError, MeshClient, StageCallError
from services.client.serving import decode, frame_request, predictions_frame, row_chunks
from services.runtime.settings import Settings

PREDICT_EPILOG = """\
The table's columns are sent as the model's inputs (mlmesh serving status lists the models; the
other columns of the training table may be present and are ignored). The output has the table's
columns, then predicted, probability_<class> for each class (classifiers), and model_version.
examples:
  mlmesh predict --model breast_cancer-logistic_regression --source new.csv --output predictions.parquet
  mlmesh predict --model churn --version 3 --source january.parquet --output january-scored.csv
"""


def add_commands(commands: Any) -> None:
    predict = commands.add_parser(
        "predict",
        help="batch predictions for a CSV or Parquet table, through the serving stage",
        epilog=PREDICT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("--model", required=True, metavar="NAME", help="a registered model name")
    predict.add_argument("--version", type=int, default=None, help="a registered version (default: the served one)")
    predict.add_argument("--source", required=True, type=Path, help="the rows to predict: a .csv or .parquet file")
    predict.add_argument(
        "--output", required=True, type=Path, help="where to write the predictions: .parquet (or .csv)"
    )

    serving = commands.add_parser(
        "serving", help="what the serving stage serves: status, pin, rollback, follow, unload"
    )
    actions = serving.add_subparsers(dest="action", required=True)
    status = actions.add_parser("status", help="every registered model, its served version and state")
    status.add_argument("--json", action="store_true")
    pin = actions.add_parser("pin", help="serve one version of NAME until told otherwise")
    pin.add_argument("name")
    pin.add_argument("version", type=int)
    rollback = actions.add_parser("rollback", help="pin NAME to the version before the one it serves")
    rollback.add_argument("name")
    follow = actions.add_parser("follow", help="serve the newest version of NAME, and each new one as it comes")
    follow.add_argument("name")
    unload = actions.add_parser("unload", help="stop serving NAME (follow or pin serves it again)")
    unload.add_argument("name")


def _read_table(path: Path) -> Any:
    import pandas as pd

    suffixes = [s.lower() for s in path.suffixes]
    if ".parquet" in suffixes:
        return pd.read_parquet(path)
    # Every column as text, so identifiers such as "02134" keep their spelling; the stage reads numbers from it.
    return pd.read_csv(path, dtype=str, keep_default_na=True)


def _write_table(frame: Any, path: Path) -> None:
    if path.suffix.lower() == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)


async def predict(settings: Settings, args: argparse.Namespace) -> int:
    import pandas as pd

    if args.output.suffix.lower() not in (".parquet", ".csv"):
        print("mlmesh predict: --output must end in .parquet or .csv", file=sys.stderr)
        return 2
    try:
        table = _read_table(args.source)
    except (OSError, ValueError) as exc:
        print(f"mlmesh predict: cannot read {args.source}: {str(exc)[:200]}", file=sys.stderr)
        return 2
    version = "" if args.version is None else str(args.version)
    try:
        async with MeshClient(settings) as client:
            metadata = await client.model_metadata(args.model, version)
            missing = [t.name for t in metadata.inputs if t.name not in table.columns]
            if missing:
                print(
                    f"mlmesh predict: {args.source} lacks the model's input column(s) "
                    f"{', '.join(repr(m) for m in missing[:5])}{' ...' if len(missing) > 5 else ''}",
                    file=sys.stderr,
                )
                return 2
            parts, versions = [], set()
            # Pinned to the version that answers first, so a rollout mid-file never mixes two models.
            for rows in row_chunks(table, metadata, settings.max_message_bytes):
                request = frame_request(args.model, version, metadata, table.iloc[rows])
                reply = await client.infer(request)
                version = version or reply.model_version
                versions.add(reply.model_version)
                parts.append(predictions_frame(decode(reply), reply.model_version))
    except (StageCallError, ConfigError) as exc:
        print(f"mlmesh predict: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a column the model takes as numbers holds text
        print(f"mlmesh predict: {str(exc)[:300]}", file=sys.stderr)
        return 2
    predictions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({"predicted": [], "model_version": []})
    result = pd.concat([table.reset_index(drop=True), predictions], axis=1)
    _write_table(result, args.output)
    print(
        f"{len(result)} predictions from {args.model} v{', v'.join(sorted(versions)) or '-'} written to {args.output}"
    )
    return 0


async def serving_command(settings: Settings, args: argparse.Namespace) -> int:
    try:
        async with MeshClient(settings) as client:
            if args.action == "status":
                return _print_status(await client.served_models(), args.json, settings.addresses["serving"])
            if args.action == "pin":
                await client.serve(args.name, args.version)
                print(
                    f"{args.name}: serving version {args.version}, pinned (mlmesh serving follow {args.name} undoes it)"
                )
            elif args.action == "rollback":
                served = {m.name: m for m in await client.served_models()}
                current = served.get(args.name)
                if current is None or not current.version.isdigit():
                    print(f"mlmesh serving: {args.name!r} is not being served; nothing to roll back", file=sys.stderr)
                    return 2
                if int(current.version) <= 1:
                    print(f"mlmesh serving: {args.name} serves version 1; there is no earlier version", file=sys.stderr)
                    return 2
                previous = int(current.version) - 1
                await client.serve(args.name, previous)
                print(f"{args.name}: rolled back from version {current.version} to {previous}, pinned")
            elif args.action == "follow":
                await client.serve(args.name)
                reply = await client.model_metadata(args.name)
                print(f"{args.name}: serving the newest version ({reply.versions[-1]}) and each new one")
            else:
                await client.unserve(args.name)
                print(f"{args.name}: no longer served (mlmesh serving follow {args.name} serves it again)")
    except (StageCallError, ConfigError) as exc:
        print(f"mlmesh serving: {exc}", file=sys.stderr)
        return 2
    return 0


def _print_status(models: list[Any], as_json: bool, address: str) -> int:
    rows = [{"name": m.name, "version": m.version, "state": m.state, "reason": m.reason} for m in models]
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"serving at {address}: no model is registered yet (a PROMOTE registers one)")
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"serving at {address}")
    for row in rows:
        version = f"v{row['version']}" if row["version"] else "-"
        print(f"  {row['name']:<{width}}  {version:<5} {row['state']:<11} {row['reason']}")
    return 0
