"""The config tree: presets load, overrides apply, bad input is one line naming the key."""

import glob
import json
import os
import re

import pytest
from pydantic import BaseModel

from gfnlm.configs import Config, ConfigError, dump_config, load_config
from gfnlm.configs.load import PRESET_DIR


def test_presets_validate():
    presets = glob.glob(os.path.join(PRESET_DIR, "*.yaml"))
    assert presets
    for p in presets:
        assert isinstance(load_config(p), Config)


def test_objective_by_name_or_section():
    assert load_config("random_number.yaml", ["learner.objective=tb"]).learner.objective.log_z_lr == 1e-2
    cfg = load_config("random_number.yaml", ["learner.objective={type: subtb, lam: 0.5}"])
    assert cfg.learner.objective.type == "subtb" and cfg.learner.objective.lam == 0.5
    assert load_config("infilling.yaml", ["learner.objective=tb", "reward.prefixes=final"]).reward.prefixes == "final"


def test_overrides_apply_and_parse_yaml_values():
    cfg = load_config("random_number.yaml", ["learner.lr=3e-4", "lora.target_modules=[q_proj,v_proj]",
                                              "task.target={type: poisson, rate: 5}", "run.progress=false"])
    assert cfg.learner.lr == 3e-4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.task.target.type == "poisson" and cfg.task.target.rate == 5
    assert cfg.run.progress is False


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("random_number.yaml", ["learner.steps=7"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def every_field(model_cls, prefix=""):
    for name, field in model_cls.model_fields.items():
        yield f"{prefix}{name}", field
        ann = field.annotation
        for sub in getattr(ann, "__args__", ()) or (ann,):
            inner = getattr(sub, "__origin__", None) and getattr(sub, "__args__", ())
            for cls in [sub, *(inner or ())]:
                if isinstance(cls, type) and issubclass(cls, BaseModel):
                    yield from every_field(cls, f"{prefix}{name}.")


def test_every_field_has_a_docstring():
    from gfnlm.configs import schema, tasks
    from gfnlm.configs.base import Section

    missing = [n for n, f in every_field(Config) if not f.description]
    sections = {c for m in (schema, tasks) for c in vars(m).values()
                if isinstance(c, type) and issubclass(c, Section) and c is not Section}
    assert len(sections) > 25
    for cls in sections:
        missing += [f"{cls.__name__}.{n}" for n, f in cls.model_fields.items() if not f.description]
    assert missing == []


@pytest.mark.parametrize(
    "override, key",
    [
        ("learner.lr=-1", "learner.lr"),
        ("learner.lrr=1", "learner.lrr: unknown key"),
        ("task.min_len=5", "min_len (5) must not exceed max_len (3)"),
        ("lora.r=0", "lora.r"),
        ("task.prompts=[]", "task.prompts"),
        ("task.prompts=['']", "task.prompts"),
        ("batch.replay=0.9", "on_policy + tempered + replay must be 1"),
        ("model.path=/no/such/model", "model.path: no such directory"),
        ("task.target={type: uniform, low: 9, high: 2}", "task.target: low (9) must not exceed high (2)"),
        ("task.target={type: gauss}", "task.target.type: unknown type gauss"),
        ("task.target={low: 3}", "task.target.type: missing"),
        ("learner.steps=many", "learner.steps"),
        ("replay.capacity_per_prompt=10", "replay.capacity_per_prompt (10)"),
        ("learner=3", "learner"),
        ("runtime.publish_every=4", "runtime.publish_every (4) exceeds runtime.max_staleness + 1 (3)"),
        ("reward.prefixes=final", "reward.prefixes: 'final' scores only the whole Z"),
        ("reward.prefixes=can_end", "reward.prefixes: 'can_end' scores only the states that can end"),
        ("learner.objective={type: dpo}", "learner.objective.type: unknown type dpo"),
        ("learner.objective={type: subtb, lam: -1}", "learner.objective.lam"),
        ("task.type=novel", "task.type: unknown type novel"),
        ("task={type: continuation}", "task.data: Field required"),
        ("task={type: infilling, data: {train: x.jsonl}, suffix_template: 'a {'}", "task.suffix_template: not a valid template"),
        ("task={type: constrained, data: {train: x.jsonl}}", "constraint: give at least one of"),
        ("reward.model=/no/such/dir", "reward.model / reward.adapter: the random-number reward is closed-form"),
        ("learner.objective=sft", "learner.objective: sft trains on the records' reference Z"),
    ],
)
def test_bad_input_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config("random_number.yaml", [override])
    msg = str(e.value)
    assert key in msg and "\n" not in msg


def test_vargrad_needs_two_samples_per_record():
    with pytest.raises(ConfigError, match="batch.samples_per_prompt: vargrad estimates each record's log Z"):
        load_config("random_number.yaml", ["learner.objective=vargrad", "batch.samples_per_prompt=1"])
    assert load_config("random_number.yaml", ["learner.objective=vargrad"]).learner.objective.type == "vargrad"


def test_model_folder_without_config_json(tmp_path):
    with pytest.raises(ConfigError, match="has no config.json"):
        load_config(None, [f"model.path={tmp_path}"])


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config("nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learner: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(None, ["learner.lr"])


@pytest.mark.parametrize("override, message", [
    (["sampler.engine=vllm", "sampler.vllm.max_lora_rank=8"], "max_lora_rank (8) is smaller than lora.r (16)"),
    (["sampler.vllm.max_lora_rank=12"], "must be one of 1, 8, 16"),
    (["sampler.vllm.max_loras=0"], "sampler.vllm.max_loras"),
    (["sampler.engine=tensorrt"], "sampler.engine"),
    (["sampler.tools=[{kind: calculator, format: 'no slot'}]"], "must contain '{}'"),
])
def test_engine_settings_are_checked_before_anything_starts(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("random_number.yaml", override)


def test_vllm_rank_defaults_to_the_smallest_that_holds_the_adapter():
    assert load_config("random_number.yaml", ["lora.r=4"]).vllm_lora_rank() == 8
    assert load_config("random_number.yaml", ["lora.r=16"]).vllm_lora_rank() == 16
    assert load_config("random_number.yaml", ["lora.r=16", "sampler.vllm.max_lora_rank=64"]).vllm_lora_rank() == 64
    assert load_config("random_number.yaml", ["lora.r=1024"]).vllm_lora_rank() is None  # the transformers engine needs none


def test_a_sampler_spec_holds_the_rank_vllm_would_take_and_none_above_its_ranks():
    """A sampler actor is built from a SamplerSpec; the transformers engine takes any LoRA rank, so a
    rank above vLLM's largest builds a spec too (it had crashed every local run before it sampled)."""
    from gfnlm.actors.engines import SamplerSpec

    assert SamplerSpec.of(load_config("random_number.yaml", ["lora.r=4"])).max_lora_rank == 8
    spec = SamplerSpec.of(load_config("random_number.yaml", ["lora.r=1024", "sampler.engine=transformers"]))
    assert spec.max_lora_rank is None and spec.lora.r == 1024


def test_auto_on_a_gpu_takes_transformers_for_a_rank_vllm_cannot_serve(tiny_llama, monkeypatch):
    import torch

    from gfnlm.actors import engines, vllm_engine
    from gfnlm.actors.policy import Policy
    from gfnlm.actors.sampler import TransformersSampler

    cfg = load_config("random_number.yaml", [f"model.path={tiny_llama}", "lora.r=1024", "lora.target_modules=[q_proj]"])
    policy = Policy(cfg.model, cfg.lora)  # on the CPU, before a GPU is made to look visible
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # where a GPU is visible and vLLM imports
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: None)
    assert engines.resolve_engine("auto", 64) == "vllm"
    sampler = engines.make_sampler(engines.SamplerSpec.of(cfg), policy.tokenizer, seed=0, policy=policy, max_model_len=64)
    assert isinstance(sampler, TransformersSampler)


def test_a_template_override_is_the_text_typed(capsys):
    """-o 'task.prompt_template={prompt}' and 'Story: {text}' (not YAML: a mapping, a syntax error)
    are taken as typed; quotes around one are removed; other values are still YAML."""
    from gfnlm.configs.load import parse_override
    from gfnlm.learner.cli import main

    assert parse_override("task.prompt_template={prompt}") == ("task.prompt_template", "{prompt}")
    assert parse_override("task.prompt_template=Story: {text}") == ("task.prompt_template", "Story: {text}")
    assert parse_override("task.prompt_template='{text} '") == ("task.prompt_template", "{text} ")
    assert parse_override("task.context_template=null") == ("task.context_template", None)
    assert parse_override("learner.steps=20") == ("learner.steps", 20)
    assert main(["check", "continuation.yaml", "-o", "task.prompt_template=Story: {text}"]) == 0
    assert "prompt_template: 'Story: {text}'" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="needs quotes inside the shell's"):
        parse_override("task.end_tokens=[a")


@pytest.mark.parametrize("override, hint", [
    ("learner.lr_scheduler=cosine", "learner.lr_scheduler: unknown key; did you mean lr_schedule?"),
    ("learner.learning_rate=0.1", "learner.learning_rate: unknown key; did you mean lr?"),
    ("task.prompt_templat=x", "task.prompt_templat: unknown key; did you mean prompt_template?"),
    ("learner.objective={type: tb, log_zlr: 1}", "learner.objective.log_zlr: unknown key; did you mean log_z_lr?"),
])
def test_an_unknown_key_says_which_it_may_have_meant(capsys, override, hint):
    from gfnlm.learner.cli import main

    assert main(["check", "continuation", "-o", override]) == 2
    assert hint in capsys.readouterr().err


def test_presets_by_bare_name_the_list_of_them_and_the_version(capsys):
    from gfnlm.learner.cli import main

    assert main(["check", "continuation"]) == 0  # the bare name, as `gfnlm experiment continuation` takes it
    capsys.readouterr()
    assert main(["check", "nothere"]) == 2
    assert "nothere: no such config file; the presets are arithmetic, cluster, constrained" in capsys.readouterr().err
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "  random_number    The README's main job" in out and "  objectives " in out and "gfnlm experiment NAME" in out
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("gfnlm ")


def test_a_csv_saved_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    from gfnlm.rewards.records import read_rows

    p = tmp_path / "excel.csv"
    p.write_bytes("\ufefftext,label\nhello,1\n".encode("utf-8"))
    assert read_rows(str(p), ["text"]) == [(2, {"text": "hello", "label": "1"})]


def test_train_without_a_config_says_what_to_give(tmp_path, monkeypatch, capsys):
    from gfnlm.learner.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    assert "train: give CONFIG, a preset name such as random_number" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing started


def test_check_knows_the_model_from_its_config_json(tiny_gpt2, capsys):
    """A GPT-2 folder given Llama's LoRA targets fails at check (its layers from config.json, no
    weights read); a hub id says how to get a local folder."""
    from gfnlm.learner.cli import main

    ov = ["-o", f"model.path={tiny_gpt2}", "-o", "lora.target_modules=[q_proj, v_proj]"]
    assert main(["check", "random_number", *ov]) == 2
    err = capsys.readouterr().err
    assert "lora.target_modules: 'q_proj', 'v_proj' matches no layer of the model" in err and "c_attn" in err
    assert main(["check", "random_number", "-o", f"model.path={tiny_gpt2}", "-o", "lora.target_modules=[c_attn]"]) == 0
    capsys.readouterr()
    assert main(["check", "random_number", "-o", "model.path=HuggingFaceTB/SmolLM2-135M"]) == 2
    assert "got a model hub id, 'HuggingFaceTB/SmolLM2-135M'; gfnlm loads local folders only" in capsys.readouterr().err


def test_the_config_reference_is_current_and_every_key_has_a_docstring():
    import os

    from gfnlm.configs.reference import reference_markdown

    path = os.path.join(os.path.dirname(__file__), "..", "docs", "config.md")
    assert open(path).read() == reference_markdown(), "regenerate: python -m gfnlm.configs.reference > docs/config.md"
    rows = [ln for ln in reference_markdown().splitlines() if ln.startswith("| `")]
    assert len(rows) > 150 and all(not ln.rstrip().endswith("|  |") for ln in rows), "a key without a docstring"


def test_check_says_when_the_floor_leaves_invalid_text_most_of_the_reward(tiny_llama, capsys):
    from gfnlm.learner.cli import main

    ov = ["-o", f"model.path={tiny_llama}"]
    assert main(["check", "random_number", *ov, "-o", "task.log_reward_floor=-5"]) == 0
    assert "gfnlm check: warning: task.log_reward_floor=-5: the ~" in capsys.readouterr().err
    assert main(["check", "random_number", *ov, "-o", "task.log_reward_floor=-50"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_child_presets_data_replaces_its_parents_and_check_names_the_files(tmp_path, capsys):
    """task.data is given whole: a child preset with its own train file does not inherit the parent's
    test file (the run would evaluate on data the user never named); check names the files it reads."""
    from gfnlm.learner.cli import main

    train = tmp_path / "mine.jsonl"
    train.write_text("".join(json.dumps({"text": f"it is {i} .", "label": i % 2}) + "\n" for i in range(6)))
    child = tmp_path / "child.yaml"
    child.write_text(f"base: subjectivity\ntask: {{data: {{train: {train}}}}}\n")
    cfg = load_config(str(child))
    assert cfg.task.data.train == str(train) and cfg.task.data.test is None and cfg.task.type == "subjectivity"
    assert cfg.task.prompt_template == load_config("subjectivity").task.prompt_template  # the rest is inherited
    child.write_text(f"base: subjectivity\ntask: {{data: {{train: {train}, test: {train}}}}}\n")
    assert main(["check", str(child)]) == 0
    assert f"; train file {train}, test file {train} (" in capsys.readouterr().err
