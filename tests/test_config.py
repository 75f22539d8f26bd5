"""memcompile.Options: validation at construction, normalization, and the error messages."""

import pytest

from memcompile import Options, OptionsError, StreamOptions
from memcompile.config import parse_bytes


def test_defaults_follow_the_design_table():
    o = Options()
    assert o.memory_budget == "auto"
    assert o.stream == "auto"
    assert o.sequence_parallel is False
    assert o.passes is None and o.disable_passes == ()
    assert o.runtime == "inductor" and o.dump_dir is None


@pytest.mark.parametrize("text,expected", [
    ("1.5GiB", 3 * 2**29), ("800MB", 800 * 10**6), ("4096", 4096), ("2 KiB", 2048),
])
def test_byte_strings_parse(text, expected):
    assert parse_bytes(text) == expected
    assert Options(memory_budget=text).memory_budget == expected


@pytest.mark.parametrize("budget", ["auto", None, 0.5, 1.0, 2**20, 10**9])
def test_valid_budgets_are_kept(budget):
    assert Options(memory_budget=budget).memory_budget == budget


@pytest.mark.parametrize("budget,readings", [
    (1, ["1 reads as 1 byte;", "for the fraction write 1.0;", "at least 1 MiB", "'512MiB'"]),
    (4096, ["4096 reads as 4,096 bytes;", "a float in (0, 1]", "at least 1 MiB", "'4096B'"]),
    (2**20 - 1, ["1048575 reads as 1,048,575 bytes;", "at least 1 MiB (1,048,576)"]),
])
def test_an_int_below_one_mib_is_refused_naming_both_readings(budget, readings):
    """`memory_budget=1` is one byte, not everything (1.0): an int below 1 MiB is refused, the
    message naming the byte reading and the fraction; strings name their unit and are kept."""
    with pytest.raises(OptionsError) as e:
        Options(memory_budget=budget)
    message = str(e.value)
    assert message.startswith("memcompile option 'memory_budget'")
    for fragment in readings:
        assert fragment in message
    assert Options(memory_budget=f"{budget}B").memory_budget == budget


@pytest.mark.parametrize("budget,fragment", [
    (True, "a bool is not a budget"), (0.0, "outside (0, 1]"), (1.5, "outside (0, 1]"),
    (-3, "not positive"), ("lots", "not a byte count"), ("3 parsecs", "not a byte count"),
    ([1], "got [1]"), ("0MiB", "0 bytes is not positive"),
])
def test_bad_budgets_name_the_key_and_the_valid_values(budget, fragment):
    with pytest.raises(OptionsError) as e:
        Options(memory_budget=budget)
    message = str(e.value)
    assert message.startswith("memcompile option 'memory_budget'")
    assert fragment in message and '"1.5GiB"' in message
    assert message.count("memcompile option") == 1 and message.count("valid:") == 1


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(OptionsError) as e:
        Options(memory_budgt=0.5)
    assert "'memory_budgt': unknown option; valid options: memory_budget, stream" in str(e.value)


def test_positional_arguments_are_refused():
    with pytest.raises(OptionsError, match="keyword arguments only"):
        Options("eager")


def test_stream_dict_becomes_stream_options():
    o = Options(stream={"chunk_size": 1024, "logits_chunk_size": 256})
    assert o.stream == StreamOptions(chunk_size=1024, logits_chunk_size=256, dim="sequence")


@pytest.mark.parametrize("stream,key", [
    ({"chunk": 3}, "stream.chunk"), ({"chunk_size": 0}, "stream.chunk_size"),
    ({"dim": "time"}, "stream.dim"), ("yes", "stream"), (1, "stream"), (0.0, "stream"),
    ({"keys_values": "twice"}, "stream.keys_values"),
    ({"layers_per_checkpoint": 0}, "stream.layers_per_checkpoint"),
    ({"layers_per_checkpoint": True}, "stream.layers_per_checkpoint"),
    ({"checkpoints": 0}, "stream.checkpoints"), ({"checkpoints": "few"}, "stream.checkpoints"),
    ({"checkpoints": 3, "layers_per_checkpoint": 2}, "stream.checkpoints"),
])
def test_bad_stream_values(stream, key):
    with pytest.raises(OptionsError, match=f"memcompile option '{key}'"):
        Options(stream=stream)


def test_a_numeric_budget_under_stream_cannot_be_combined_with_fixed_checkpoints():
    assert Options(stream={"checkpoints": 3}).stream.checkpoints == 3
    assert Options(stream=True, memory_budget="1GiB").memory_budget == 2**30
    for fixed in ({"checkpoints": 3}, {"layers_per_checkpoint": 2}):
        with pytest.raises(OptionsError, match="memory_budget.*set one or the other"):
            Options(stream=fixed, memory_budget=0.5)
        assert Options(stream=fixed, memory_budget=None).memory_budget is None


def test_pass_names_are_checked_against_the_registry():
    assert Options(passes=["remove_noops"]).passes == ("remove_noops",)
    with pytest.raises(OptionsError, match="unknown pass 'nope'; valid passes: "
                                           "sequence_parallel, remove_noops, "
                                           "extern_embedding_backward, sequence_parallel_grads, "
                                           "plan_remat"):
        Options(disable_passes=["nope"])
    with pytest.raises(OptionsError, match="a list of pass names"):
        Options(passes="remove_noops")


def test_runtime_and_sequence_parallel_and_dump_dir():
    with pytest.raises(OptionsError, match="valid: inductor, eager"):
        Options(runtime="tvm")
    with pytest.raises(OptionsError, match="valid: balanced, ring"):
        Options(sequence_parallel={"schedule": "zigzag"})
    assert Options(sequence_parallel={"schedule": "balanced"}).sequence_parallel.layout == \
        "zigzag"
    with pytest.raises(OptionsError, match="None or a directory path"):
        Options(dump_dir=3)


def test_options_are_frozen_and_replace_validates():
    o = Options(runtime="eager")
    with pytest.raises(AttributeError):
        o.runtime = "inductor"
    assert o.replace(runtime="inductor").runtime == "inductor"
    with pytest.raises(OptionsError):
        o.replace(runtime="jit")


def test_from_mapping():
    assert Options.from_mapping(None) == Options()
    assert Options.from_mapping({"runtime": "eager"}).runtime == "eager"
    with pytest.raises(OptionsError, match="expected a dict of options"):
        Options.from_mapping(["runtime"])
