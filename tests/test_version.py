"""Which kvtwist this is: ``kvtwist.version.version()``, from a source tree, an installation, or neither."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import kvtwist
from kvtwist.version import version
from serverproc import twistd

PACKAGE = Path(kvtwist.__file__).resolve().parent


def treeVersion() -> str:
    """The version in the setup.cfg of the tree these tests belong to."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(Path(__file__).resolve().parent.parent / "setup.cfg")
    return parser["metadata"]["version"]


def copyOfTheTree(tmp_path: Path, setupCfg: str | None) -> Path:
    """
    A directory of links to a small kvtwist tree, as the benchmark builds for
    its baseline and PyPy servers: the tree holds what ``kvtwist.version``
    needs and, if given, a ``setup.cfg``.
    """
    tree = tmp_path / "tree"
    (tree / "kvtwist").mkdir(parents=True)
    for name in ("__init__.py", "version.py"):
        shutil.copy(PACKAGE / name, tree / "kvtwist" / name)
    if setupCfg is not None:
        (tree / "setup.cfg").write_text(setupCfg)
    links = tmp_path / "links"
    links.mkdir()
    (links / "kvtwist").symlink_to(tree / "kvtwist", target_is_directory=True)
    return links


def versionIn(links: Path, *pythonFlags: str) -> subprocess.CompletedProcess[str]:
    """What ``version()`` says in a new interpreter that imports kvtwist from ``links``."""
    env = dict(os.environ, PYTHONPATH=str(links))
    return subprocess.run(
        [sys.executable, *pythonFlags, "-c", "from kvtwist.version import version; print(version())"],
        env=env, cwd=links, capture_output=True, text=True, timeout=60,
    )


def test_this_tree_says_the_version_of_its_setup_cfg() -> None:
    assert version() == treeVersion()


def test_the_package_attribute_is_the_same_answer() -> None:
    assert kvtwist.__version__ == version()


def test_a_tree_run_through_links_says_its_own_version(tmp_path: Path) -> None:
    # The interpreter has this kvtwist installed: its metadata would name the
    # wrong version for the other tree the benchmark runs as a baseline.
    links = copyOfTheTree(tmp_path, "[metadata]\nname = kvtwist\nversion = 9.8.7\n")
    result = versionIn(links)
    assert (result.returncode, result.stdout, result.stderr) == (0, "9.8.7\n", "")


@pytest.mark.parametrize("setupCfg", ["[metadata]\nname = other\nversion = 1.0\n", None])
def test_without_the_tree_s_setup_cfg_the_installed_metadata_answers(tmp_path: Path, setupCfg: str | None) -> None:
    try:
        installed = metadata.version("kvtwist")
    except metadata.PackageNotFoundError:
        pytest.skip("kvtwist is not installed in this interpreter")
    result = versionIn(copyOfTheTree(tmp_path, setupCfg))
    assert (result.returncode, result.stdout) == (0, f"{installed}\n")


@pytest.mark.parametrize(
    "setupCfg",
    [None, "[metadata\nname = kvtwist\n", "[metadata]\nname = kvtwist\n", "[metadata]\nname = kvtwist\nversion = attr: x.y\n"],
)
def test_with_neither_it_says_unknown_and_does_not_crash(tmp_path: Path, setupCfg: str | None) -> None:
    # -S: no site-packages, so no installed metadata, as for a PyPy that
    # runs kvtwist from a source tree.
    result = versionIn(copyOfTheTree(tmp_path, setupCfg), "-S")
    assert (result.returncode, result.stdout, result.stderr) == (0, "unknown\n", "")


def test_an_unreadable_setup_cfg_is_no_crash(tmp_path: Path) -> None:
    links = copyOfTheTree(tmp_path, None)
    (tmp_path / "tree" / "setup.cfg").write_bytes(b"[metadata]\nname = kvtwist\nversion = \xff\xfe\n")
    result = versionIn(links, "-S")
    assert (result.returncode, result.stdout, result.stderr) == (0, "unknown\n", "")


def test_twistd_kvstore_version(tmp_path: Path) -> None:
    # Before, the plugin's options printed Twisted's version.
    result = subprocess.run([twistd(), "kvstore", "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"kvtwist {version()}\n", "")
