"""Book-level tests (browser, Colab-style): run after the book build, see
README.md. Kept apart from tests/, the fast bnlib unit tests."""

from bookconfig import SUMMARY


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in config.stash.get(SUMMARY, []):
        terminalreporter.write_line(line)
