"""Every shell command of README.md and of every page in docs/, run as written (issue 14, section 5).

Which docs
    README.md, then every docs/*.md (a glob: a new page is covered as soon as it exists, and its
    commands must be classified before this test passes). The pages run in name order, except
    that a page whose commands use what another page's commands leave behind runs after that
    page (RUNS_AFTER: docs/deploy.md after docs/security.md, whose recipe makes the certs/ that
    deploy.md signs again). README.md runs first: its `make run` registers the model that later
    pages' `mlmesh models` list, and its runs fill the artifacts/ that PLACEHOLDERS read.

What is run
    Every fenced block whose language is sh, bash, shell, zsh or console is split into
    commands: a command ends where bash's own parser (`bash -n`) says it is complete, so
    continuation lines and quotes spanning lines stay together. Lines that are only a comment
    are documentation (sample output) and are not run; a `console` block runs its `$ ` lines.
    Each command gets exactly one kind, from the tables below, by a regular expression matched
    at its start (after leading `VAR=value` words, so `MLMESH_STAGE=trainer .venv/bin/python`
    is classified as `.venv/bin/python`):

    - EXCLUDED: cannot run on one machine (a cluster, a registry, Docker image builds) or must
      not run here (`make test`). The list is small, every entry says why, and every entry must
      still match a command in the docs (no stale exclusions).
    - DELEGATED: another test file already runs the command as written; this test asserts that
      the other file holds the same command (its text, or its argv as a Python literal list),
      or, for a whole section the other test extracts from the docs at run time, the string it
      extracts it by.
    - BACKGROUND: long-running (`mlmesh up`): started in its own process group, waited for until
      it says the mesh is up, and stopped with SIGINT (Ctrl-C) when its section ends. The
      commands after it in the section are "another terminal", in that order.
    - RUN: a known command that runs on one machine; its exit status must be 0, and for key
      commands the output must show a stable documented fact (EXPECT: a decision, SERVING, ...).
    - shell state: pure assignments (`G=.venv/bin/grpcurl`, `export MLMESH_TLS_CA=...`,
      `LOADED=$(grpcurl ...)`): run like RUN commands, so their command substitutions run too.

    A command that matches nothing FAILS the test: a command added to the docs is either run
    or consciously classified. `<placeholders>` in a command are replaced by values taken from
    the state the earlier commands left (PLACEHOLDERS; each must still be used); any other
    placeholder fails the test.

How it is run
    - Sessions. Each section (the text under one heading) is one terminal: one bash, commands
      in order, shell variables carried from block to block, `set -o pipefail` (a failure in a
      pipeline is not hidden by its last command). Sections run in document order, the docs
      in the order above. Sections the docs say need a running mesh (NEEDS_MESH) get one: `.venv/bin/mlmesh up`, started by the test
      in the same working copy, stopped before any other section that runs commands (some
      start their own mesh). Where an excluded `docker run` would start Jaeger for a section
      (NEEDS_COLLECTOR), an OTLP receiver of the test listens on 127.0.0.1:4317 instead, and
      the section's commands must send it spans. Every command has a timeout (TIMEOUTS); on a timeout the
      section is killed and the command is reported.
    - The working copy. A copy of this working tree (tracked files and untracked, not ignored
      ones, as they are on disk, so uncommitted work is tested as the rest of the suite tests
      it), made into its own git repository. `git status --porcelain` there must be the same
      before and after all commands: the docs' commands (make included) modify no tracked file
      and leave no file git does not ignore.
    - The venv. A venv is not relocatable, and `pip install -e` points `services` at this
      checkout, not at a copy. So the copy gets its own `.venv`: `python -m venv --without-pip`
      of the same interpreter, whose site-packages holds one .pth naming the copy's root and
      its proto/ (what the editable install maps, for this checkout) and then this checkout's
      .venv site-packages, for the third-party packages (a plain path entry: its .pth files,
      this checkout's editable finder included, are not processed). Its bin/ holds this
      checkout's console scripts (mlmesh, pyflyte, grpcurl, ...) with their `#!` line pointing
      at the copy's python. So every command runs the copy's code from the copy's folder.
      `.venv/.installed` is touched, so `make` sees the venv as installed: the state after a
      first `make run`. Creating the venv (pip and the network) is not tested here.
    - The user. HOME and TMPDIR are private; no MLMESH_*, OTEL_* or OPENLINEAGE* variable is
      inherited; PATH is the caller's without any .venv/bin. The docs call `.venv/bin/...`
      explicitly and never ask to activate the venv, so a bare `python` or `grpcurl` in the
      docs would be a docs bug this test reports. jq, curl and openssl come from the system.
    - The network. The docs use the default ports (gRPC 50051-50055, metrics 9451-9455), which
      a developer's own mesh or another test may hold. So everything runs in a network
      namespace of its own (`unshare -n`, or `unshare -rn` without root; lo brought up),
      entered with nsenter; only loopback exists there, and nothing in these commands needs
      more. Where namespaces are not allowed, the commands run in the host's network if the
      default ports are free, and the test skips otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A page that needs what another page's commands leave behind: {page: the page it runs after}. The
# pages are otherwise in name order (README.md always runs first).
RUNS_AFTER: dict[str, str] = {
    "docs/deploy.md": "docs/security.md",  # signs again the certs/stage.csr that security.md's recipe makes
}


def docs_in_order() -> tuple[str, ...]:
    pages = sorted(path.relative_to(REPO).as_posix() for path in (REPO / "docs").glob("*.md"))
    ordered: list[str] = []

    def place(page: str, seen: tuple[str, ...] = ()) -> None:
        assert page not in seen, f"RUNS_AFTER has a cycle: {[*seen, page]}"
        if page in ordered:
            return
        before = RUNS_AFTER.get(page)
        if before in pages:
            place(before, (*seen, page))
        ordered.append(page)

    for page in pages:
        place(page)
    return ("README.md", *ordered)


DOCS = docs_in_order()
SHELL_LANGUAGES = {"sh", "bash", "shell", "zsh", "console"}


# ---- what each command is ------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    pattern: str  # a regular expression matched at the start of the command
    why: str = ""
    doc: str | None = None  # only in this document ...
    section: str | None = None  # ... and under this heading
    delegate: str | None = None  # DELEGATED: the test file that runs it
    evidence: str | None = None  # DELEGATED: a string that file must hold (default: the command itself)

    def matches(self, command: Command) -> bool:
        if self.doc is not None and command.doc != self.doc:
            return False
        if self.section is not None and command.section != self.section:
            return False
        return command.head is not None and re.match(self.pattern, command.head) is not None


EXCLUDED = [
    Rule(r"make test-fast\b", "runs the fast tier of this suite, this test included: recursion"),
    Rule(r"make test\b", "runs the whole test suite, this test included: recursion"),
    Rule(
        r"kubectl ",
        "needs a Kubernetes cluster (tests/test_deploy_static.py runs docs/deploy.md's kubectl "
        "commands with --dry-run=client)",
    ),
    Rule(r"pyflyte run --remote\b", "needs a Flyte cluster"),
    Rule(
        r"docker ",
        "needs a Docker engine as root and image builds of several minutes; `--push` and the Jaeger "
        "image need a registry. tests/test_compose.py builds the images and drives "
        "deploy/docker-compose.yml (with its own arguments: a unique project, free ports)",
    ),
    Rule(
        r"curl -s -G http://127\.0\.0\.1:9090/",
        "the Prometheus of compose's `observability` profile, which "
        "needs Docker as above; tests/test_compose.py queries it over the same HTTP API",
        doc="docs/deploy.md",
    ),
    Rule(
        r"\.venv/bin/python bench/bench_scale\.py --rows 1000000\b",
        "docs/performance.md's figures at 1M and 10M rows, repeated: tens of minutes on 2 cores",
    ),
    Rule(
        r"\.venv/bin/python bench/bench_serving\.py --profile 20\b",
        "docs/performance.md's serving table: three servers, four cases, 3 runs of 10 s each and a profile, "
        "about 10 minutes on 2 cores; tests/test_bench.py runs the same benchmark with the quick options",
    ),
    Rule(
        r"(\.venv/bin/python -m services\.runtime\.probe|\$G -cacert certs/ca\.pem -H \"\$AUTH\") "
        r"(--address )?(127\.0\.0\.1|localhost):50051\b",
        "a stage in the cluster, through `kubectl port-forward`",
        doc="docs/deploy.md",
        section="Deploy",
    ),
    Rule(
        r"curl -s http://127\.0\.0\.1:9451/metrics",
        "a stage's metrics in the cluster, through `kubectl port-forward`",
        doc="docs/deploy.md",
        section="Kubernetes",
    ),
]

DELEGATED = [
    Rule(r"\.venv/bin/python bench/bench_scale\.py --rows 20000\b", "about a minute", delegate="tests/test_bench.py"),
    Rule(
        r'\$G -cacert certs/ca\.pem -H "\$APP" ',
        "serving in the cluster, through `kubectl port-forward`; that test runs the block's client lines "
        "against a serving process with the pod's settings and Secrets",
        doc="docs/deploy.md",
        section="Serving models",
        delegate="tests/test_deploy_static.py",
        evidence='"kubectl -n mlmesh port-forward svc/serving 50056:50056 &"',
    ),
    Rule(
        r"\.venv/bin/python bench/bench_serving\.py --runs 1\b",
        "about a minute, and a minute more the first time for MLServer's venv (from PyPI): a slow and network test",
        delegate="tests/test_bench.py",
    ),
    Rule(
        r"\.venv/bin/(pyflyte run workflow/pipeline\.py|mlmesh models)",
        "six pyflyte runs, two of them sweeps: a minute and more; that test runs the block from a folder "
        "with a data.csv and checks every result",
        doc="docs/workflow.md",
        section="Running the workflow",
        delegate="tests/test_workflow.py",
        evidence='"\\n## Running the workflow\\n"',
    ),
    Rule(
        r"(curl -s http://127\.0\.0\.1:945\d/metrics |\.venv/bin/mlmesh (status|with-mesh -- \.venv/bin/pyflyte run))",
        "needs an OTLP receiver at 127.0.0.1:4317; that test gives it one and checks the run's trace arrives",
        doc="docs/observability.md",  # the whole page: that test runs its blocks together
        delegate="tests/test_observability.py",
        evidence='(ROOT / "docs" / "observability.md").read_text()',
    ),
]

BACKGROUND = [Rule(r"\.venv/bin/mlmesh up\s*(#.*)?$")]
READY = "mesh is up"  # what `mlmesh up` prints once all five stages are SERVING

RUN = [
    Rule(pattern)
    for pattern in (
        r"make run\b",
        r"make (lint|format)\b",
        r"make \.venv-clients/\.installed$",  # tritonclient's venv: linked to this checkout's (see make_venv)
        r"\.venv-clients/bin/python - <<'EOF'",
        r"\.venv/bin/python -c ",
        r"\.venv/bin/(mlmesh|pyflyte|grpcurl) ",
        r"\.venv/bin/python -m services\.runtime\.probe\b",
        r"\$G ",  # G=.venv/bin/grpcurl
        r"curl -s http://127\.0\.0\.1:\d+/",
        r"(mkdir|printf|openssl|awk|chmod|chgrp|echo|jq) ",
        r"for stage in loader preprocess features trainer evaluator serving; do ",
    )
]

# Sections that say a mesh must be running, without starting one themselves.
NEEDS_MESH = {
    ("docs/grpcurl.md", "One stage at a time"): "With the mesh up (`mlmesh up`)",
    ("docs/grpcurl.md", "The whole chain by hand"): "on the same running mesh",
    (
        "docs/deploy.md",
        "The short version",
    ): "grpcurl to compose's published ports: the default ports, which a local mesh serves too",
    ("docs/deploy.md", "The images"): "the probe asks a running stage",
    (
        "docs/deploy.md",
        "Calling a service with grpcurl from the host",
    ): "compose's published ports are the default ports",
    ("docs/deploy.md", "On one machine"): "With `.venv/bin/mlmesh up` running in another terminal",
    ("docs/serving.md", "Calling it"): "With `.venv/bin/mlmesh up` running",
    ("docs/serving.md", "Rollout, pinning and rollback"): "the same running mesh",
    (
        "docs/deploy.md",
        "The model server",
    ): "compose's published port 50056 is serving's default port, which a local mesh serves too",
}

# Sections whose excluded `docker run` starts a trace collector (Jaeger) on 127.0.0.1:4317: an OTLP
# receiver of the test stands in for it, and the section must send it spans.
NEEDS_COLLECTOR = {("docs/deploy.md", "Traces")}
COLLECTOR = """
import sys
from concurrent import futures
import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        with open(sys.argv[1], "a") as spans:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    spans.writelines(span.name + "\\n" for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

server = grpc.server(futures.ThreadPoolExecutor(2))
trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Collector(), server)
server.add_insecure_port("127.0.0.1:4317")
server.start()
print("ready", flush=True)
server.wait_for_termination()
"""

# What a placeholder stands for, from the state the earlier commands left (docs/store.md
# documents both folders).
PLACEHOLDERS = {
    "<run id>": "$(ls -t artifacts/runs | head -n 1)",
    "<sha256, 6+ digit prefix, or artifact URI>": "$(ls artifacts/manifests | head -n 1 | cut -c 1-12)",
    "-- CMD ARGS": "-- .venv/bin/mlmesh status",
}

# Stable facts the output of key commands must show (searched in the command, then in its output).
EXPECT = [
    (r"^make run\b", r"PROMOTE"),
    (r"mlmesh status", r"(?s)(SERVING.*){5}"),
    (r"mlmesh run ", r"(?i)decision|PROMOTE|REJECT"),
    (r"ProgressService/WatchCall", r"parsing, deciding column roles"),
    (r"mlmesh models", r"breast_cancer"),  # `make run` registered its model
    (r"GRPCInferenceService/ModelInfer\s*$", r'"model_version": "\d+"'),
    (r"(?s)GRPCInferenceService/ModelInfer.*@base64d", r"(?m)^\d+\n(benign|malignant)$"),  # the version, the class
    (r"\.venv-clients/bin/python - <<'EOF'", r"version \d+"),  # tritonclient's answer names the version
    (r"mlmesh serving status", r"READY"),
    (r"mlmesh predict ", r"predictions from \S+ v\d+ written to "),
    # deploy.md's RepositoryIndex: serving serves the model `make run` registered
    (r"-d '\{\}' localhost:50056 inference\.GRPCInferenceService/RepositoryIndex", r"breast_cancer"),
    (r"mlmesh lineage ", r"\S"),
    (
        r"grpcurl -plaintext localhost:50051 list|\$G -plaintext localhost:50051 list|\$G \$TLS localhost:50051 list",
        r"mlmesh\.loader\.v1\.LoaderService",
    ),
    (r"grpc\.health\.v1\.Health/Check", r'"status": "SERVING"'),
    (r"LoaderService/Load\s*$", r'"rows": "\d+"'),
    (r"TrainerService/Train\s*$", r'(?s)"progress".*"result"'),
    (r'echo "\$REPORT" \| jq', r'"decision": "DECISION_PROMOTE"'),
    (r"Operations/WaitOperation", r'"done": true'),
    (r"openssl x509 -in certs/stage\.pem -noout", r"loader\.mlmesh\.svc\.cluster\.local"),
    (r"pyflyte --pkgs workflow package", r"(?s).*"),  # and the archive exists: see the test
]

TIMEOUTS = [  # seconds; the first match wins
    (r"make run\b", 300),
    (r"\.venv/bin/(mlmesh run|pyflyte)", 240),
    (r".*TrainerService/(Train|StartTraining)|.*WaitOperation", 180),
    (r"\.venv/bin/mlmesh up", 90),
]
DEFAULT_TIMEOUT = 120


# ---- reading the docs ----------------------------------------------------------------------
@dataclass
class Command:
    doc: str
    section: str
    line: int
    text: str  # as written
    kind: str = ""
    rule: Rule | None = None
    run_text: str = ""  # as run: the text, placeholders replaced
    head: str | None = field(init=False)  # the command after leading VAR=value words; None: only assignments

    def __post_init__(self) -> None:
        self.head = command_head(self.text)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line} [{self.section}]"


def _word_end(text: str, i: int) -> int:
    """Where the shell word starting at text[i] ends: quotes and $( ) nest, as bash reads them."""
    stack: list[str] = []
    while i < len(text):
        c = text[i]
        top = stack[-1] if stack else ""
        if c == "\\":
            i += 2
            continue
        if top == '"':
            if c == '"':
                stack.pop()
            elif text.startswith("$(", i):
                stack.append("(")
                i += 1
        elif c == "'":
            i = text.index("'", i + 1) if "'" in text[i + 1 :] else len(text)
        elif c == '"':
            stack.append('"')
        elif text.startswith("$(", i) or c == "(":
            stack.append("(")
            i += 1 if c == "$" else 0
        elif c == ")" and top == "(":
            stack.pop()
        elif not stack and c in " \t\n;&|":
            return i
        i += 1
    return i


def command_head(text: str) -> str | None:
    rest = text.strip()
    if rest.startswith("export "):
        rest = rest[len("export ") :].lstrip()
    while (assignment := re.match(r"[A-Za-z_][A-Za-z0-9_]*=", rest)) is not None:
        rest = rest[_word_end(rest, assignment.end()) :].lstrip(" \t")
    return None if not rest or rest.startswith("#") else rest


def _complete(text: str) -> bool:
    # bash -n accepts an unterminated here-document (it only warns): a command with one runs to its end word.
    for delimiter in re.findall(r"<<-?\s*['\"]?(\w+)['\"]?", text):
        if not re.search(rf"^\s*{delimiter}$", text, re.M):
            return False
    return subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True).returncode == 0


def shell_blocks(doc: str) -> list[tuple[str, int, str, list[str]]]:
    """(section, line of the first line, language, lines) of every fenced block of `doc`."""
    blocks, section, fence, lines, start, language, indent = [], "", None, [], 0, "", ""
    for number, line in enumerate((REPO / doc).read_text().splitlines(), 1):
        if fence is None:
            opening = re.match(r"^([ \t]*)(`{3,}|~{3,})\s*([^\s`]*)", line)
            if opening:
                indent, fence, language, lines, start = opening[1], opening[2], opening[3].lower(), [], number + 1
            elif heading := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line):
                section = heading[1]
        elif line.strip() == fence:
            blocks.append((section, start, language, lines))
            fence = None
        else:
            lines.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
    assert fence is None, f"{doc}: a code block opened at line {start - 1} never closes"
    return blocks


def doc_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        for section, start, language, lines in shell_blocks(doc):
            if language not in SHELL_LANGUAGES:
                looks_like_shell = [
                    line
                    for line in lines
                    if re.match(
                        r"\$ |\.venv/|make |mlmesh |pyflyte |grpcurl |docker |kubectl |helm |curl |python3? ", line
                    )
                ]
                assert language or not looks_like_shell, (
                    f"{doc}:{start - 1}: a code block without a language holds commands ({looks_like_shell[0]!r}); "
                    "mark it ```sh so that tests/test_docs.py runs it"
                )
                continue
            pending: list[str] = []
            first = 0
            for offset, line in enumerate(lines):
                if language == "console" and not pending:
                    if not line.startswith("$ "):
                        continue
                    line = line[2:]
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                if not pending:
                    first = start + offset
                pending.append(line)
                text = "\n".join(pending)
                if line.rstrip().endswith("\\") or not _complete(with_placeholders(text)):
                    continue
                commands.append(Command(doc, section, first, text))
                pending = []
            assert not pending, (
                f"{doc}:{first}: the command never completes (bash -n; an unknown <placeholder>? "
                "add it to PLACEHOLDERS):\n" + "\n".join(pending)
            )
    return commands


def classify(commands: list[Command]) -> None:
    for command in commands:
        for kind, rules in (("excluded", EXCLUDED), ("delegated", DELEGATED), ("background", BACKGROUND), ("run", RUN)):
            rule = next((rule for rule in rules if rule.matches(command)), None)
            if rule is not None:
                command.kind, command.rule = kind, rule
                break
        else:
            if command.head is None:
                command.kind = "state"
        command.run_text = with_placeholders(command.text)


def with_placeholders(text: str) -> str:
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return text


def timeout_of(command: Command) -> float:
    return next((seconds for pattern, seconds in TIMEOUTS if re.match(pattern, command.head or "")), DEFAULT_TIMEOUT)


def delegated_evidence(command: Command) -> list[str]:
    """What the delegate file must hold: the rule's evidence, or the command as text or as argv."""
    assert command.rule is not None
    if command.rule.evidence is not None:
        return [command.rule.evidence]
    argv = shlex.split(command.text, comments=True)
    return [command.text.split("  #")[0].strip()] + [", ".join(json.dumps(a) for a in argv[k:]) for k in (0, 1)]


# ---- the static checks: every command is classified, every rule is used --------------------------
def test_every_command_in_the_docs_is_classified() -> None:
    commands = doc_commands()
    classify(commands)
    assert len(commands) > 50 and {"README.md", "docs/deploy.md"} <= {c.doc for c in commands} <= set(DOCS)
    for page, before in RUNS_AFTER.items():
        assert page in DOCS and before in DOCS, f"RUNS_AFTER names a page that is gone: {page} after {before}"
        assert DOCS.index(before) < DOCS.index(page), f"RUNS_AFTER: {page} must run after {before}"
    problems = [
        f"{c.where}: no rule says how to test `{c.text}`: add it to RUN, EXCLUDED (with the reason) or "
        "DELEGATED in tests/test_docs.py"
        for c in commands
        if not c.kind
    ]
    for c in commands:
        if c.kind in ("run", "background", "state"):
            left = re.findall(r"<[A-Za-z][^<>\n]*>", c.run_text.split("  #")[0])
            if left:
                problems.append(f"{c.where}: `{c.text}` holds {left}: add the placeholder to PLACEHOLDERS")
    for name, rules in (("EXCLUDED", EXCLUDED), ("DELEGATED", DELEGATED), ("BACKGROUND", BACKGROUND), ("RUN", RUN)):
        for rule in rules:
            if not any(c.rule is rule for c in commands):
                problems.append(f"{name} rule {rule.pattern!r} matches no command of the docs any more: remove it")
    for placeholder in PLACEHOLDERS:
        if not any(placeholder in c.text for c in commands if c.kind in ("run", "background", "state")):
            problems.append(f"PLACEHOLDERS: {placeholder!r} is in no command any more: remove it")
    for doc, section in NEEDS_MESH:
        if not any(c.doc == doc and c.section == section and c.kind == "run" for c in commands):
            problems.append(f"NEEDS_MESH: {doc} [{section}] has no command to run any more: remove it")
    for doc, section in NEEDS_COLLECTOR:
        if not any(c.doc == doc and c.section == section and c.kind == "run" for c in commands):
            problems.append(f"NEEDS_COLLECTOR: {doc} [{section}] has no command to run any more: remove it")
    for pattern, _ in EXPECT:
        if not any(re.search(pattern, c.text) for c in commands if c.kind in ("run", "state")):
            problems.append(f"EXPECT {pattern!r} matches no command that is run: remove it")
    for c in commands:
        if c.kind == "delegated":
            assert c.rule is not None and c.rule.delegate is not None
            # Compared without whitespace: the formatter may spread an argument list over lines.
            source = re.sub(r"\s+", "", (REPO / c.rule.delegate).read_text())
            if not any(re.sub(r"\s+", "", evidence) in source for evidence in delegated_evidence(c)):
                problems.append(
                    f"{c.where}: `{c.text}` is delegated to {c.rule.delegate}, which does not hold it "
                    f"(looked for {delegated_evidence(c)})"
                )
    assert not problems, "\n".join(problems)


# ---- the working copy, the user, the network ----------------------------------------------------
def make_working_copy(dest: Path) -> None:
    listed = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, listed):
        source, target = REPO / name, dest / name
        if not (source.is_file() or source.is_symlink()):
            continue  # deleted in the working tree
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target, follow_symlinks=False)
    git = ["git", "-c", "user.name=docs test", "-c", "user.email=docs@localhost", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "the working tree under test"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)


def make_venv(dest: Path) -> None:
    main_venv = REPO / ".venv"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    main_site = main_venv / "lib" / version / "site-packages"
    if not main_site.is_dir():
        pytest.skip(f"no {main_site}: run `make` first")
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(dest / ".venv")], check=True)
    site = dest / ".venv" / "lib" / version / "site-packages"
    (site / "_mlmesh_docs.pth").write_text(f"{dest}\n{dest / 'proto'}\n{main_site}\n")
    shebang = f"#!{main_venv}/bin/python"
    for script in sorted((main_venv / "bin").iterdir()):
        target = dest / ".venv" / "bin" / script.name
        if target.exists() or not script.is_file():
            continue
        with script.open("rb") as handle:
            first = handle.readline()
        if first.startswith(shebang.encode()):
            body = script.read_bytes().split(b"\n", 1)[1]
            target.write_bytes(f"#!{dest}/.venv/bin/python\n".encode() + body)
            target.chmod(0o755)
        elif first.startswith(b"\x7fELF"):  # a native tool (ruff): nothing in it names the venv
            target.symlink_to(script)
    (dest / ".venv" / ".installed").touch()  # make's stamp: the venv is installed
    # tritonclient's venv (make test makes it) is linked, not made: its stamp is newer than the
    # copied requirements (copy2 keeps their time), so the docs' `make .venv-clients/.installed` has nothing to do.
    clients = REPO / ".venv-clients"
    if (clients / ".installed").is_file():
        (dest / ".venv-clients").symlink_to(clients)


def write_data_csv(folder: Path, rows: int = 400) -> None:
    """The `data.csv` of docs/cli.md and docs/workflow.md, with a `price` target, a zip code stored
    as a number and a row id: the user's own table, which the docs do not make."""
    import numpy as np
    import pandas as pd

    rng = np.random.RandomState(0)
    zips = rng.choice([2134, 10001, 94105, 60601], size=rows)
    rooms = rng.randint(1, 6, size=rows)
    price = 100 * rooms + np.select([zips == 94105, zips == 10001], [900, 600], 200) + rng.normal(0, 20, rows)
    pd.DataFrame({"row_id": np.arange(rows), "zip": zips, "rooms": rooms, "price": price.round(2)}).to_csv(
        folder / "data.csv", index=False
    )


def user_environment(base: Path, workdir: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLMESH_", "OTEL_", "OPENLINEAGE", "FLYTE_", "PYTEST_", "VIRTUAL_ENV", "PYTHONPATH"))
    }
    path = [
        p
        for p in os.environ.get("PATH", "/usr/bin:/bin").split(os.pathsep)
        if p and not p.rstrip("/").endswith(".venv/bin")
    ]
    env.update(HOME=str(base / "home"), TMPDIR=str(base / "tmp"), PATH=os.pathsep.join(path), PWD=str(workdir))
    for folder in ("home", "tmp"):
        (base / folder).mkdir(exist_ok=True)
    return env


DEFAULT_PORTS = [*range(50051, 50057), *range(9451, 9457)]


class Network:
    """A network namespace of our own, kept by a `sleep` and entered with nsenter."""

    def __init__(self) -> None:
        self.holder: subprocess.Popen | None = None
        self.enter: list[str] = []
        self.note = ""
        unshare = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
        if (
            shutil.which("unshare")
            and shutil.which("nsenter")
            and shutil.which("ip")
            and subprocess.run([*unshare, "true"], capture_output=True).returncode == 0
        ):
            self.holder = subprocess.Popen([*unshare, "sleep", "infinity"], start_new_session=True)
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{self.holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
                assert time.monotonic() < deadline, "unshare made no network namespace"
                time.sleep(0.05)
            self.enter = ["nsenter", "-t", str(self.holder.pid), "-n"]
            if os.geteuid() != 0:
                self.enter += ["-U", "--preserve-credentials"]
            subprocess.run([*self.enter, "ip", "link", "set", "lo", "up"], check=True)
            self.note = "in a network namespace of its own"
        else:
            taken = [port for port in DEFAULT_PORTS if not _port_free(port)]
            if taken:
                pytest.skip(f"no network namespace here (unshare -n) and the docs' default ports {taken} are taken")
            self.note = "in the host's network (no namespace allowed), on free default ports"

    def close(self) -> None:
        if self.holder is None:
            return
        namespace = os.readlink(f"/proc/{self.holder.pid}/ns/net")
        for entry in Path("/proc").iterdir():  # whatever we started in it and is still there
            if entry.name.isdigit() and int(entry.name) != self.holder.pid:
                try:
                    if os.readlink(entry / "ns" / "net") == namespace:
                        os.kill(int(entry.name), signal.SIGKILL)
                except OSError:
                    pass
        self.holder.kill()
        self.holder.wait()


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(OSError):
        os.killpg(pid, sig)


# ---- running the sessions ----------------------------------------------------------------------
@dataclass
class Outcome:
    command: Command
    code: int | None = None  # exit status; None: never finished
    output: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    stopped_code: int | None = None  # BACKGROUND: its exit status after Ctrl-C
    problem: str = ""  # found by the harness after the session (a collector that got nothing)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output.rstrip().splitlines()[-lines:])

    def report(self, problem: str) -> str:
        shown = (
            self.command.text
            if self.command.run_text == self.command.text
            else f"{self.command.text}\n  (run as: {self.command.run_text})"
        )
        return (
            f"{self.command.where}: {problem} after {self.seconds:.1f}s\n  $ {shown}\n"
            f"  --- last lines of its output ---\n{self.tail()}\n"
        )


class Docs:
    def __init__(self, base: Path, workdir: Path, env: dict[str, str], network: Network) -> None:
        self.base, self.workdir, self.env, self.network = base, workdir, env, network
        self.mesh: subprocess.Popen | None = None
        self.mesh_log = base / "harness-mesh-0.log"
        self.mesh_starts = 0
        self.sessions = 0

    # The mesh the docs assume is running ("with the mesh up"), started as they say.
    def mesh_up(self) -> None:
        if self.mesh is not None:
            return
        self.mesh_starts += 1
        self.mesh_log = self.base / f"harness-mesh-{self.mesh_starts}.log"
        with self.mesh_log.open("wb") as log:
            self.mesh = subprocess.Popen(
                [*self.network.enter, ".venv/bin/mlmesh", "up"],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 90
        while READY not in self.mesh_log.read_text(errors="replace"):
            assert self.mesh.poll() is None and time.monotonic() < deadline, (
                "`.venv/bin/mlmesh up` (for the sections that need a mesh) did not come up:\n"
                + self.mesh_log.read_text(errors="replace")[-3000:]
            )
            time.sleep(0.1)

    def mesh_down(self) -> None:
        if self.mesh is None:
            return
        _kill_group(self.mesh.pid, signal.SIGINT)
        try:
            code = self.mesh.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(self.mesh.pid)
            self.mesh.wait()
            code = None
        self.mesh = None
        assert code == 0, (
            f"the test's `mlmesh up` ended with {code} on Ctrl-C:\n" + self.mesh_log.read_text(errors="replace")[-3000:]
        )

    def run_session(self, commands: list[Command]) -> list[Outcome]:
        """One terminal: the section's commands in order, in one bash, timed one by one."""
        self.sessions += 1
        folder = self.base / "sessions" / f"{self.sessions:02d}"
        folder.mkdir(parents=True)
        status = folder / "status"
        status.touch()
        script = ["set -o pipefail", f"exec 3>>{shlex.quote(str(status))}"]
        background = []
        for i, command in enumerate(commands):
            (folder / f"{i}.sh").write_text(command.run_text + "\n")
            source, out = shlex.quote(str(folder / f"{i}.sh")), shlex.quote(str(folder / f"{i}.out"))
            script.append(f'echo "start {i} $EPOCHREALTIME" >&3')
            if command.kind == "background":
                # Its own process group, SIGINT not ignored: what a terminal gives a foreground job.
                ready = shlex.quote(READY)
                script += [
                    f"set -m; ( . {source} ) >{out} 2>&1 </dev/null & __job_{i}=$!; set +m",
                    f'echo "group {i} $__job_{i}" >&3',
                    f"until grep -q {ready} {out}; do kill -0 $__job_{i} 2>/dev/null || break; sleep 0.1; done",
                    f'grep -q {ready} {out}; echo "end {i} $? $EPOCHREALTIME" >&3',
                ]
                background.append(i)
            else:
                script += [f"{{ . {source}; }} >{out} 2>&1 </dev/null", f'echo "end {i} $? $EPOCHREALTIME" >&3']
        for i in reversed(background):  # Ctrl-C in the first terminal
            script += [
                f"kill -INT -- -$__job_{i} 2>/dev/null; wait $__job_{i}",
                f'echo "stopped {i} $? $EPOCHREALTIME" >&3',
            ]
        (folder / "session.sh").write_text("\n".join(script) + "\n")
        session = subprocess.Popen(
            [*self.network.enter, "bash", str(folder / "session.sh")],
            cwd=self.workdir,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(folder / "session.err").open("wb"),
            start_new_session=True,
        )
        timed_out = None
        while session.poll() is None:
            events = [line.split() for line in status.read_text().splitlines()]
            started = {int(e[1]): float(e[2]) for e in events if e[0] == "start"}
            ended = {int(e[1]) for e in events if e[0] == "end"}
            running = [i for i in started if i not in ended]
            if running and time.time() - started[running[0]] > timeout_of(commands[running[0]]):
                timed_out = running[0]
                for e in events:
                    if e[0] == "group":
                        _kill_group(int(e[2]))
                _kill_group(session.pid)
                session.wait()
                break
            time.sleep(0.1)
        events = [line.split() for line in status.read_text().splitlines()]
        outcomes = []
        for i, command in enumerate(commands):
            outcome = Outcome(command, timed_out=(i == timed_out))
            out = folder / f"{i}.out"
            outcome.output = out.read_text(errors="replace") if out.exists() else ""
            start = next((float(e[2]) for e in events if e[0] == "start" and int(e[1]) == i), None)
            for e in events:
                if e[0] == "end" and int(e[1]) == i:
                    outcome.code = int(e[2])
                    outcome.seconds = float(e[3]) - (start or float(e[3]))
                elif e[0] == "stopped" and int(e[1]) == i:
                    outcome.stopped_code = int(e[2])
            if outcome.timed_out and start is not None:
                outcome.seconds = time.time() - start
            outcomes.append(outcome)
        err = (folder / "session.err").read_text(errors="replace")
        if err.strip() and outcomes:
            outcomes[-1].output += "\n[session stderr]\n" + err
        return outcomes

    def run_all(self, commands: list[Command]) -> list[Outcome]:
        sections: dict[tuple[str, str, int], list[Command]] = {}
        for command in commands:
            if command.kind in ("run", "background", "state"):
                sections.setdefault((command.doc, command.section, 0), []).append(command)
        outcomes = []
        for (doc, section, _), members in sections.items():
            if any(c.kind in ("run", "background") for c in members):
                self.mesh_up() if (doc, section) in NEEDS_MESH else self.mesh_down()
            if (doc, section) in NEEDS_COLLECTOR:
                outcomes += self.with_collector(members)
            else:
                outcomes += self.run_session(members)
        self.mesh_down()
        return outcomes

    def with_collector(self, members: list[Command]) -> list[Outcome]:
        spans = self.base / f"collector-{self.sessions + 1}.spans"
        spans.touch()
        collector = subprocess.Popen(
            [*self.network.enter, ".venv/bin/python", "-c", COLLECTOR, str(spans)],
            cwd=self.workdir,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            assert collector.stdout is not None and collector.stdout.readline().strip() == "ready", (
                "the test's OTLP receiver on 127.0.0.1:4317 did not start: " + collector.stdout.read()[-2000:]
            )
            outcomes = self.run_session(members)
            deadline = time.monotonic() + 15  # the last batch of spans is exported at exit
            while not spans.read_text().strip() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            _kill_group(collector.pid)
            collector.wait()
        if not spans.read_text().strip() and outcomes:
            outcomes[-1].problem = "the section's commands sent no span to the collector at 127.0.0.1:4317"
        return outcomes


def check(outcome: Outcome, workdir: Path) -> str | None:
    command = outcome.command
    if outcome.timed_out:
        return outcome.report(f"timed out ({timeout_of(command):.0f}s)")
    if outcome.problem:
        return outcome.report(outcome.problem)
    if outcome.code is None:
        return outcome.report("never finished (an earlier command of its section ended the session)")
    if command.kind == "background":
        if outcome.code != 0:
            return outcome.report(f"never said {READY!r}")
        if outcome.stopped_code != 0:
            return outcome.report(f"exited {outcome.stopped_code} on Ctrl-C, not 0")
        return None
    if outcome.code != 0:
        return outcome.report(f"exited {outcome.code}")
    for pattern, expected in EXPECT:
        if re.search(pattern, command.text) and not re.search(expected, outcome.output):
            return outcome.report(f"exited 0 but its output lacks {expected!r}")
    if (package := re.search(r"package -o (\S+)", command.text)) and not (workdir / package[1]).is_file():
        return outcome.report(f"made no {package[1]}")
    return None


# ---- the test ---------------------------------------------------------------------------------
@pytest.mark.timeout(900)
@pytest.mark.slow  # every command of the docs in a copy of the checkout, meshes and pyflyte runs included: minutes
def test_the_docs_commands_run_as_written(tmp_path: Path) -> None:
    if shutil.which("jq") is None:
        pytest.skip("docs/grpcurl.md's chain of calls needs jq")
    commands = doc_commands()
    classify(commands)
    unclassified = [c for c in commands if not c.kind]
    assert not unclassified, f"unclassified commands (see the other test): {[c.text for c in unclassified]}"

    workdir = tmp_path / "mlmesh"
    workdir.mkdir()
    make_working_copy(workdir)
    make_venv(workdir)
    write_data_csv(workdir)
    before = subprocess.run(
        ["git", "status", "--porcelain"], cwd=workdir, capture_output=True, text=True, check=True
    ).stdout
    env = user_environment(tmp_path, workdir)
    network = Network()
    started = time.monotonic()
    try:
        docs = Docs(tmp_path, workdir, env, network)
        outcomes = docs.run_all(commands)
    finally:
        network.close()
    elapsed = time.monotonic() - started

    ran = [o for o in outcomes if o.command.kind in ("run", "background")]
    summary = (
        f"{len(ran)} commands run {network.note} in {elapsed:.0f}s; "
        f"{sum(c.kind == 'delegated' for c in commands)} delegated, "
        f"{sum(c.kind == 'excluded' for c in commands)} excluded"
    )
    print(summary)
    for outcome in sorted(outcomes, key=lambda o: -o.seconds)[:8]:
        print(f"  {outcome.seconds:6.1f}s  {outcome.command.where}  {outcome.command.text.splitlines()[0][:90]}")
    failures = [problem for outcome in outcomes if (problem := check(outcome, workdir))]
    assert not failures, f"{summary}\n\n" + "\n".join(failures)

    after = subprocess.run(
        ["git", "status", "--porcelain"], cwd=workdir, capture_output=True, text=True, check=True
    ).stdout
    assert after == before, (
        f"the docs' commands changed the working copy (`git status --porcelain`):\nbefore:\n{before}\nafter:\n{after}"
    )
