"""`qcompile eval --text --tokenizer`: perplexity over sliding windows, against numpy on a bigram model."""
import json

import numpy as np
import pytest

from qcompile.cli import main
from qcompile.io import save_model
from qcompile.perplexity import negative_log_likelihoods, windows
from tests.helpers import parse

VOCAB = 12
WORDS = [f"w{i}" for i in range(VOCAB - 1)] + ["[UNK]"]


def _bigram(table: np.ndarray, inputs: str = "int64[1, S] input_ids") -> str:
    """logits[t] = table[ids[t]]: the next-token scores depend on the current token only."""
    values = ", ".join(f"{v:.5f}" for v in table.reshape(-1))
    return f"""
    <ir_version: 8, opset_import: ["" : 17]>
    g ({inputs}) => (float[1, S, {table.shape[1]}] logits) <float[{VOCAB}, {table.shape[1]}] table = {{{values}}}> {{
        logits = Gather(table, input_ids)
    }}
    """


def _tokenizer(path, words=WORDS) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return str(path)


@pytest.fixture
def bigram(tmp_path):
    """Reference and candidate (its table perturbed) models, the tokenizer, a text, and its token ids."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, VOCAB)).astype(np.float32)
    paths = {}
    for name, array in (("reference", table), ("candidate", table + 0.1 * rng.standard_normal(table.shape))):
        paths[name] = tmp_path / f"{name}.onnx"
        save_model(parse(_bigram(array)), paths[name])
    ids = rng.integers(0, VOCAB - 1, 101)
    (tmp_path / "text.txt").write_text(" ".join(WORDS[i] for i in ids))
    return paths, _tokenizer(tmp_path / "tokenizer.json"), str(tmp_path / "text.txt"), table, ids


def test_every_token_after_the_first_is_predicted_once_with_context_before_it():
    for count, window, stride in ((101, 16, 5), (10, 4, 3), (7, 16, 8), (33, 8, 1), (2, 2, 1)):
        predicted = []
        for start, stop, scored in windows(count, window, stride):
            assert 1 <= scored <= stop - start and stop - start <= window
            assert start == 0 or stop - scored - start >= window - stride  # the context before the predictions
            predicted += range(stop - scored, stop)
        assert predicted == list(range(1, count))


def test_eval_reports_both_perplexities_as_numpy_computes_them(bigram, capsys):
    paths, tokenizer, text, table, ids = bigram
    code = main(["eval", str(paths["reference"]), str(paths["candidate"]), "--text", text, "--tokenizer", tokenizer,
                 "--window", "16", "--stride", "5", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)["perplexity"]
    expected = np.exp(negative_log_likelihoods(table[ids[:-1]].astype(np.float64), ids[1:]).mean())
    assert result["predicted"] == 100 and result["reference"] == pytest.approx(expected, rel=1e-5)
    assert result["candidate"] != pytest.approx(result["reference"], rel=1e-3)
    assert result["ratio"] == pytest.approx(result["candidate"] / result["reference"])
    assert 10 < result["logits"]["sqnr_db"] < 40


@pytest.mark.parametrize("args, message", [
    (["--text", "TEXT"], "perplexity needs both --text FILE and --tokenizer"),
    ([], "eval needs --data DATA, or --text FILE --tokenizer"),
    (["--text", "missing.txt", "--tokenizer", "TOKENIZER"], "missing.txt: no such text file"),
    (["--text", "TEXT", "--tokenizer", "TEXT"], "not a tokenizer.json"),
    (["--text", "TEXT", "--tokenizer", "TOKENIZER", "--window", "8", "--stride", "8"], "--stride 8: expected 1 to 7"),
])
def test_bad_perplexity_arguments_are_one_line_usage_errors(bigram, capsys, args, message):
    paths, tokenizer, text, _, _ = bigram
    args = [{"TEXT": text, "TOKENIZER": tokenizer}.get(a, a) for a in args]
    assert main(["eval", str(paths["reference"]), str(paths["candidate"]), *args]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1


def test_a_tokenizer_larger_than_the_models_vocabulary_names_both_sizes(bigram, tmp_path, capsys):
    paths, _, text, _, _ = bigram
    larger = _tokenizer(tmp_path / "larger.json", WORDS[:-1] + [f"x{i}" for i in range(20)] + ["[UNK]"])
    assert main(["eval", str(paths["reference"]), str(paths["candidate"]), "--text", text, "--tokenizer", larger]) == 2
    assert "the tokenizer has 32 tokens, the model's vocabulary 12" in capsys.readouterr().err


def test_a_model_with_other_inputs_than_token_ids_is_refused(bigram, tmp_path, capsys):
    paths, tokenizer, text, table, _ = bigram
    cached = tmp_path / "cached.onnx"
    save_model(parse(_bigram(table, "int64[1, S] input_ids, float[1, 4] past")), cached)
    assert main(["eval", str(cached), str(paths["candidate"]), "--text", text, "--tokenizer", tokenizer]) == 2
    assert "inputs are input_ids (and attention_mask, position_ids); it takes input_ids, past" in capsys.readouterr().err


def test_compile_verify_bounds_the_perplexity_and_names_both(bigram, tmp_path, capsys):
    """w8a16 on the bigram table: its INT8 rows raise the perplexity a little; a bound below that fails."""
    paths, tokenizer, text, _, _ = bigram
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    common = ["compile", str(paths["reference"]), "-o", str(out), "--recipe", "w8a16", "--verify",
              "--verify-text", text, "--tokenizer", tokenizer, "--report", str(report), "--quiet"]
    assert main(common + ["--max-perplexity-ratio", "1.5"]) == 0
    perplexity = json.loads(report.read_text())["verification"]["perplexity"]
    assert perplexity["passed"] and perplexity["ratio"] != 1.0 and perplexity["max_ratio"] == 1.5
    capsys.readouterr()
    tight = 1 + (perplexity["ratio"] - 1) / 2 if perplexity["ratio"] > 1 else None
    if tight is None:
        pytest.skip("INT8 rows lowered this text's perplexity: no bound between 1 and the ratio to test")
    assert main(common + ["--max-perplexity-ratio", str(tight)]) == 1
    assert "above --max-perplexity-ratio" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--verify-text", "TEXT"], "--verify-text needs --verify"),
    (["--verify", "--verify-text", "TEXT"], "--verify-text and --tokenizer go together"),
    (["--verify", "--max-perplexity-ratio", "1.2"], "--max-perplexity-ratio needs --verify-text"),
])
def test_bad_perplexity_bounds_are_usage_errors(bigram, tmp_path, capsys, args, message):
    paths, tokenizer, text, _, _ = bigram
    args = [{"TEXT": text, "TOKENIZER": tokenizer}.get(a, a) for a in args]
    assert main(["compile", str(paths["reference"]), "-o", str(tmp_path / "o.onnx"), "--recipe", "w8a16",
                 *args]) == 2
    assert message in capsys.readouterr().err


def test_a_perplexity_ratio_below_1_is_refused_by_the_parser(bigram, tmp_path, capsys):
    paths, tokenizer, text, _, _ = bigram
    with pytest.raises(SystemExit) as exit:
        main(["compile", str(paths["reference"]), "-o", str(tmp_path / "o.onnx"), "--recipe", "w8a16", "--verify",
              "--verify-text", text, "--tokenizer", tokenizer, "--max-perplexity-ratio", "0.9"])
    assert exit.value.code == 2 and "expected a finite ratio of at least 1" in capsys.readouterr().err
