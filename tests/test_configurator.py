import pytest

from conftest import assert_clean_error, run
from configurator import ConfigError, apply_config

DEFAULTS = dict(batch_size=12, learning_rate=6e-4, compile=True, device='auto', start='\n', top_k=None)


def test_defaults_config_file_then_arguments(tmp_path):
    config_file = tmp_path / 'exp.py'
    config_file.write_text('import math\nbatch_size = 64\nlearning_rate = 1e-3 * math.sqrt(4)\n_scratch = [1, 2]\n')
    config = apply_config(DEFAULTS, [str(config_file), '--batch_size=32', '--compile=False', '--device=cuda:1'])
    assert config == dict(DEFAULTS, batch_size=32, learning_rate=2e-3, compile=False, device='cuda:1')


def test_literal_parsing_and_types():
    config = apply_config(DEFAULTS, ['--learning_rate=3', '--start=123', "--top_k=5"])
    assert config['learning_rate'] == 3.0 and isinstance(config['learning_rate'], float)
    assert config['start'] == '123'  # a string setting keeps the text as typed
    assert config['top_k'] == 5  # a None default takes any value
    assert apply_config(DEFAULTS, ['--start="ROMEO:"'])['start'] == 'ROMEO:'
    assert apply_config(DEFAULTS, ['--start=a=b'])['start'] == 'a=b'


def test_a_bare_flag_turns_a_boolean_on():
    assert apply_config(dict(DEFAULTS, compile=False), ['--compile'])['compile'] is True
    assert apply_config(DEFAULTS, ['--compile', '--compile=False'])['compile'] is False  # the last one wins


@pytest.mark.parametrize('argv, message', [
    (['--batch_size=3.5'], 'batch_size must be int'),
    (['--compile=1'], 'compile must be bool'),
    (['--batch_size=True'], 'batch_size must be int'),
    (['--learning_rat=1e-3'], "did you mean learning_rate"),
    (['--zzz=1'], "unknown config key 'zzz'"),
    (['--batch_size'], 'malformed argument'),
    (['batch_size=3'], "config file 'batch_size=3' not found"),
])
def test_mistakes(argv, message):
    with pytest.raises(ConfigError, match=message):
        apply_config(DEFAULTS, argv)


def test_config_file_mistakes(tmp_path):
    typo = tmp_path / 'typo.py'
    typo.write_text('batch_sise = 3\n')
    with pytest.raises(ConfigError, match='did you mean batch_size'):
        apply_config(DEFAULTS, [str(typo)])
    broken = tmp_path / 'broken.py'
    broken.write_text('batch_size = = 3\n')
    with pytest.raises(ConfigError, match='error in config file'):
        apply_config(DEFAULTS, [str(broken)])
    wrong_type = tmp_path / 'wrong.py'
    wrong_type.write_text("batch_size = '12'\n")
    with pytest.raises(ConfigError, match='batch_size must be int'):
        apply_config(DEFAULTS, [str(wrong_type)])


def test_scripts_report_mistakes_in_one_line():
    assert_clean_error(run('train.py', '--n_layr=2', check=False), 'n_layer')
    proc = run('train.py', 'config/nonexistent.py', check=False)
    assert proc.returncode == 2
    assert_clean_error(proc, 'not found')
    assert_clean_error(run('train.py', '--dropout=high', check=False), 'dropout must be float')


def test_help_lists_every_key_with_default_and_comment():
    proc = run('train.py', '--help')
    assert '--batch_size' in proc.stdout and '= 12' in proc.stdout
    assert 'micro-batch size' in proc.stdout
    assert '--learning_rate' in proc.stdout and '--init_from' in proc.stdout
    # module constants, imported (PLOT_NAME, TOKENIZER_FILE) or the script's own (AUTO_VAL_BYTES), are no settings
    prepare_help = run('prepare.py', '--help').stdout
    for name in ('PLOT_NAME', 'TOKENIZER_FILE', 'METRICS_NAME', 'AUTO_VAL_BYTES'):
        assert name not in proc.stdout + prepare_help
    assert '--val_fraction' in prepare_help
    assert_clean_error(run('train.py', '--PLOT_NAME=x.png', check=False), "unknown config key 'PLOT_NAME'")


def test_explicit_settings_and_inheriting_a_saved_run(tmp_path):
    """What the command line or a config file sets (even to its default value) is explicit; inherit() takes the
    saved run's value of every other setting, checked against the default's type."""
    from configurator import inherit
    config_file = tmp_path / 'cfg.py'
    config_file.write_text('batch_size = 12  # its default, but set here\n')
    config = apply_config(DEFAULTS, [str(config_file), '--compile=False'])
    assert config.explicit == {'batch_size', 'compile'}
    saved = dict(batch_size=64, compile=True, learning_rate=1e-3, device='cuda', gone_key=1)
    assert sorted(inherit(config, saved, keep=('device',))) == ['learning_rate']
    assert config['batch_size'] == 12 and config['compile'] is False and config['learning_rate'] == 1e-3
    assert config['device'] == DEFAULTS['device']
    with pytest.raises(ConfigError, match='learning_rate must be float'):
        inherit(apply_config(DEFAULTS, []), dict(learning_rate='fast'))


@pytest.mark.parametrize('argv, key, expected', [
    (['--start=' + 'ROMEO ' * 1500], 'start', 'ROMEO ' * 1500),  # MemoryError in Python's parser, before
    (['--start=' + 'x' * 100_000], 'start', 'x' * 100_000),
    (['--start="' + 'ROMEO ' * 1500 + '"'], 'start', 'ROMEO ' * 1500),  # quoted: still parsed, as a string
    (['--start=' + '(' * 200], 'start', '(' * 200),
    (['--device=' + 'ROMEO ' * 1500], 'device', 'ROMEO ' * 1500),
])
def test_long_text_stays_text(argv, key, expected):
    assert apply_config(DEFAULTS, argv)[key] == expected


@pytest.mark.parametrize('argv, message', [
    (['--batch_size=' + '1 ' * 5000], 'batch_size must be int'),
    (['--top_k=' + '[' * 100_000], None),  # a None default takes the text as it is
])
def test_long_values_of_other_settings_are_refused_or_kept_as_text(argv, message):
    if message:
        with pytest.raises(ConfigError, match=message):
            apply_config(DEFAULTS, argv)
    else:
        assert apply_config(DEFAULTS, argv)['top_k'] == argv[0].split('=', 1)[1]
