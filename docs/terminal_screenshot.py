"""Take a screenshot of a command as a terminal shows it (for docs/images/).

    python3 -m venv /tmp/shot && /tmp/shot/bin/pip install pyte
    /tmp/shot/bin/python docs/terminal_screenshot.py docs/images/make-run.png -- make run
    /tmp/shot/bin/python docs/terminal_screenshot.py docs/images/ctrl-c.png --interrupt-after 20 -- \
        .venv/bin/mlmesh run --start-mesh --source sklearn:digits --model random_forest --hp n_estimators=20000

The command runs under a pseudo-terminal, so it draws what a person sees (the live
progress display included); pyte, a terminal emulator, keeps the final screen; the
screen becomes an HTML page, and headless Chromium (tests/chromium_bin.py) turns it
into a PNG. pyte is needed only here, so it is not a project dependency.
"""

from __future__ import annotations

import html
import os
import pty
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyte

ROOT = Path(__file__).resolve().parents[1]
COLUMNS, LINES = 120, 60
_COLOURS = {
    "black": "#1e1e1e",
    "red": "#e06c75",
    "green": "#98c379",
    "brown": "#e5c07b",
    "yellow": "#e5c07b",
    "blue": "#61afef",
    "magenta": "#c678dd",
    "cyan": "#56b6c2",
    "white": "#dcdfe4",
    "default": "#dcdfe4",
}


def run_on_a_terminal(command: list[str], interrupt_after: float | None = None) -> pyte.Screen:
    """The command's final screen; with `interrupt_after`, Ctrl-C (SIGINT to its process group) after that long."""
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.ByteStream(screen)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, on the terminal's slave side
        os.environ.update({"COLUMNS": str(COLUMNS), "LINES": str(LINES), "TERM": "xterm-256color"})
        os.chdir(ROOT)
        os.execvp(command[0], command)
    started = time.monotonic()
    while True:
        if interrupt_after is not None and time.monotonic() - started > interrupt_after:
            os.killpg(pid, signal.SIGINT)  # the terminal's Ctrl-C reaches its foreground group
            interrupt_after = None
        if not select.select([fd], [], [], 0.2)[0]:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        stream.feed(chunk)
    os.waitpid(pid, 0)
    return screen


def _colour(name: str, default: str) -> str:
    if name in _COLOURS:
        return _COLOURS[name]
    return f"#{name}" if len(name) == 6 and all(c in "0123456789abcdef" for c in name.lower()) else default


def last_line(screen: pyte.Screen) -> int:
    return max(
        (y for y in range(screen.lines) if "".join(screen.buffer[y][x].data for x in range(screen.columns)).strip()),
        default=0,
    )


def screen_html(screen: pyte.Screen, title: str) -> str:
    rows = []
    last = last_line(screen)
    for y in range(last + 1):
        cells = []
        for x in range(screen.columns):
            char = screen.buffer[y][x]
            style = f"color:{_colour(char.fg, _COLOURS['default'])}"
            if char.bold:
                style += ";font-weight:bold"
            cells.append(f'<span style="{style}">{html.escape(char.data)}</span>')
        rows.append("".join(cells).rstrip())
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>"
        "body{margin:0;background:#282c34}.bar{background:#3a3f4b;color:#aab;font:13px sans-serif;padding:6px 12px}"
        "pre{margin:0;padding:12px 14px;font:14px/1.35 'DejaVu Sans Mono',monospace;color:#dcdfe4}"
        f"</style></head><body><div class='bar'>{html.escape(title)}</div><pre>{chr(10).join(rows)}</pre></body></html>"
    )


def main() -> int:
    output, command = Path(sys.argv[1]), sys.argv[sys.argv.index("--") + 1 :]
    options = sys.argv[2 : sys.argv.index("--")]
    interrupt_after = float(options[options.index("--interrupt-after") + 1]) if "--interrupt-after" in options else None
    screen = run_on_a_terminal(command, interrupt_after)
    sys.path.insert(0, str(ROOT))
    from tests.chromium_bin import chromium

    with tempfile.TemporaryDirectory() as folder:
        page = Path(folder) / "screen.html"
        page.write_text(screen_html(screen, "$ " + " ".join(command)))
        browser = chromium()
        shot = subprocess.run(
            [
                str(browser.program),
                "--no-sandbox",
                "--hide-scrollbars",
                f"--screenshot={output.resolve()}",
                f"--window-size={COLUMNS * 9 + 40},{(last_line(screen) + 1) * 19 + 70}",
                page.as_uri(),
            ],
            env={**os.environ, **browser.env},
            capture_output=True,
            text=True,
            timeout=120,
        )
    print(shot.stderr[-500:] if shot.returncode else f"wrote {output}")
    return shot.returncode


if __name__ == "__main__":
    sys.exit(main())
