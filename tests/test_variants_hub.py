"""`adapters pull` refuses a LoRA variant we do not implement by name, like every other command
(the check sits in peft_format.load_adapter, which pull goes through)."""

from __future__ import annotations

import pytest
from hubserver import HubServer
from test_hub import ALICE, point_at
from tiny import make_peft_adapter

from adapterhub_local.cli import main


@pytest.fixture(scope="module")
def hub():
    with HubServer(users={ALICE: "alice"}) as server:
        yield server


def seed(hub, repo_id: str, folder) -> None:
    """Put a PEFT folder on the test Hub directly (push would refuse it)."""
    st = hub.state
    repo = st.create_repo(repo_id, repo_id.split("/")[0], False)
    head = st.resolve_rev(repo, "main")
    files = dict(head.files)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        data = (folder / name).read_bytes()
        files[name] = st.entry(name, st.store(data), len(data), name.endswith(".safetensors"))
    repo.branches["main"] = st.new_commit(repo, head, files, "add adapter").id


def test_pull_refuses_kasa_by_name(hub, llama_dir, tmp_path, monkeypatch, capsys):
    from peft import KasaConfig

    ad = make_peft_adapter(llama_dir, tmp_path / "kasa", kasa_config=KasaConfig())
    point_at(hub, monkeypatch, tmp_path)
    seed(hub, "alice/kasa", ad)
    capsys.readouterr()
    try:
        main(["pull", "alice/kasa", "--name", "k"])
        code = 0
    except SystemExit as e:
        code = e.code
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("error: ") and "kasa_config=" in err[0] and "is not supported" in err[0]
    try:
        main(["list", "--json"])
    except SystemExit:
        pass
    assert '"k"' not in capsys.readouterr().out  # nothing registered
