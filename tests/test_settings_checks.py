"""Settings that make no sense are refused in one line before anything runs: sampling controls that are not finite
(inf or nan made every probability nan, and torch.multinomial raise), a Hugging Face tokenizer that needs custom code.
train.py's own (seed=-1, learning_rate=1e38, threads=100000, wandb_log without wandb) are in faults.BAD_SETTINGS,
which test_faults runs through the script."""
import builtins
import json
import math

import pytest

from decoder import check_controls
from tokenizer import HFTokenizer, TokenizerError


@pytest.mark.parametrize('bad, message', [
    (dict(temperature=math.inf), 'temperature=inf is negative or not finite'),
    (dict(temperature=math.nan), 'temperature=nan is negative or not finite'),
    (dict(temperature=-1.0), 'temperature=-1.0 is negative or not finite'),
    (dict(repetition_penalty=math.inf), 'repetition_penalty=inf must be positive'),
    (dict(repetition_penalty=math.nan), 'repetition_penalty=nan must be positive'),
])
def test_sampling_controls_that_are_not_finite_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        check_controls(**bad)


def test_a_tokenizer_that_needs_custom_code_is_refused_in_one_line_without_asking(tmp_path, monkeypatch, hub_offline):
    """transformers asks "run the custom code? [y/N]" on a terminal when trust_remote_code is not given: it must never
    get to ask (input() fails here), and the refusal says why in one line."""
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
        {'tokenizer_class': 'MyTokenizer', 'auto_map': {'AutoTokenizer': ['my_tokenizer.MyTokenizer', None]}}))
    (tmp_path / 'my_tokenizer.py').write_text('raise SystemExit("custom code ran")\n')

    def asked(*args):
        raise AssertionError('transformers asked whether to run custom code')
    monkeypatch.setattr(builtins, 'input', asked)
    with pytest.raises(TokenizerError) as error:
        HFTokenizer(str(tmp_path))
    text = str(error.value)
    assert '\n' not in text and 'needs custom code of its own (trust_remote_code), which is never run here' in text
