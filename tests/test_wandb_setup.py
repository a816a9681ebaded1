"""wandb's mode, project and group: online for a user logged in with `wandb login` (a netrc entry), offline into
the run dir otherwise, and one project and group for a pipeline's training and eval."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from align.train.tracking import WANDB_PROJECT, configure_wandb, wandb_group, wandb_logged_in


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No wandb settings in the environment and a netrc path of the test's own (the user's is never read)."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_PROJECT", "WANDB_RUN_GROUP"):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    return netrc


def login(netrc: Path, host: str = "api.wandb.ai") -> None:
    """What `wandb login` writes."""
    netrc.write_text(f"machine {host}\n  login user\n  password {'k' * 40}\n")
    netrc.chmod(0o600)


def test_a_user_logged_in_with_wandb_login_runs_online(clean_env: Path, tmp_path: Path) -> None:
    assert not wandb_logged_in()
    login(clean_env)
    assert wandb_logged_in()
    assert configure_wandb(["wandb"], str(tmp_path)) == "online"
    assert os.environ["WANDB_MODE"] == "online" and os.environ["WANDB_PROJECT"] == WANDB_PROJECT


def test_without_a_key_wandb_runs_offline_into_the_run_dir(clean_env: Path, tmp_path: Path) -> None:
    login(clean_env, host="wandb.example.com")  # logged in to another server, not the one runs go to
    assert configure_wandb(["wandb"], str(tmp_path)) == "offline"
    assert os.environ["WANDB_DIR"] == str(tmp_path)


def test_a_self_hosted_server_and_the_users_own_settings_are_honoured(
        clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    login(clean_env, host="wandb.example.com")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wandb_logged_in()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    assert configure_wandb(["wandb"], str(tmp_path)) == "disabled" and os.environ["WANDB_PROJECT"] == "mine"
    assert configure_wandb(["tensorboard"], str(tmp_path)) is None


def test_an_unreadable_netrc_means_not_logged_in(clean_env: Path) -> None:
    clean_env.write_text("machine api.wandb.ai login\n")  # torn: no password token
    assert not wandb_logged_in()


def test_a_pipelines_runs_share_a_group_and_a_users_group_is_kept(clean_env: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with wandb_group("quickstart"):
        assert os.environ["WANDB_RUN_GROUP"] == "quickstart"
    assert "WANDB_RUN_GROUP" not in os.environ
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep-7")
    with wandb_group("quickstart"):
        assert os.environ["WANDB_RUN_GROUP"] == "sweep-7"
    assert os.environ["WANDB_RUN_GROUP"] == "sweep-7"
