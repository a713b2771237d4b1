"""The README's config table must match the real defaults (one source of truth: the code)."""
import ast
import os
import re

from conftest import REPO
from dizoo_imgcls.config import default_config


def readme_table_rows():
    text = open(os.path.join(REPO, 'README.md')).read()
    section = text.split('## Main config keys', 1)[1].split('\n## ', 1)[0]
    for line in section.splitlines():
        match = re.match(r'^\| `([^|]+)` \| `([^|]+)` \|', line)
        if match:
            yield match.group(1), match.group(2)


def lookup(cfg, dotted):
    node = cfg
    for part in dotted.split('.'):
        node = node[part]
    return node


def test_every_documented_key_exists_with_its_documented_default():
    cfg = default_config()
    rows = list(readme_table_rows())
    assert len(rows) > 20
    for keys, defaults in rows:
        names = [k.strip(' `') for k in keys.split('/')]
        values = [v.strip(' `') for v in defaults.split('/')]
        prefix = names[0].rsplit('.', 1)[0] + '.' if '.' in names[0] else ''
        for i, (name, value) in enumerate(zip(names, values)):
            dotted = name if i == 0 else prefix + name
            actual = lookup(cfg, dotted)
            try:
                expected = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                expected = value
            assert actual == expected, f'README says {dotted} defaults to {value!r}, code has {actual!r}'
