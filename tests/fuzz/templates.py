"""Chat templates that misbehave, and random ones built from fragments.

The unsafe ones try to reach Python (attribute tricks known to escape weak Jinja sandboxes) and, if
they got there, would create the case's marker file. Loops, recursion and huge output must end within
the renderer's time, memory and output limits.
"""

from __future__ import annotations

import random
from pathlib import Path


def _touch(marker: Path) -> str:
    return f"open('{marker}', 'w').write('template')"


def catalog(marker: Path) -> dict[str, object]:
    """name -> chat_template value (most are strings; some are the other JSON types a config may hold)."""
    m = str(marker)
    touch = _touch(marker)
    return {
        # attribute tricks: each would run code if the sandbox let it through
        "cycler-globals-os": f"{{{{ cycler.__init__.__globals__.os.system('touch {m}') }}}}",
        "joiner-globals-popen": f"{{{{ joiner.__init__.__globals__.os.popen('touch {m}').read() }}}}",
        "lipsum-globals": f"{{{{ lipsum.__globals__['os'].system('touch {m}') }}}}",
        "namespace-globals": f"{{{{ namespace.__init__.__globals__['__builtins__']['exec'](\"{touch}\") }}}}",
        "mro-subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "attr-filter-escaped": "{{ ''|attr('\\x5f\\x5fclass\\x5f\\x5f')|attr('\\x5f\\x5fmro\\x5f\\x5f') }}",
        "subclass-warning-builtins": (
            "{% for c in ().__class__.__base__.__subclasses__() %}{% if c.__name__ == 'catch_warnings' %}"
            f"{{{{ c()._module.__builtins__['exec'](\"{touch}\") }}}}{{% endif %}}{{% endfor %}}"
        ),
        "self-context": f"{{{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch {m}') }}}}",
        "format-string": "{{ '{0.__class__.__mro__}'.format('') }}",
        "format-map": "{{ '{x.__class__}'.format_map({'x': 1}) }}",
        "raise-exception-globals": "{{ raise_exception.__globals__ }}",
        "messages-class": "{{ messages.__class__.__base__.__subclasses__() }}",
        "dict-items-self": "{{ messages[0].items.__self__.__class__ }}",
        "tojson-default": "{{ messages|tojson(default=cycler) }}",
        "setattr-namespace": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns }}",
        # runaway work
        "nested-loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "range-huge": "{% for i in range(10**9) %}x{% endfor %}",
        "string-times-huge": "{{ 'x' * 10**9 }}",
        "string-doubling": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "output-past-limit": "{% for i in range(20000) %}{{ 'y' * 1000 }}{% endfor %}",
        "recursive-macro": "{% macro r(n) %}{{ r(n + 1) }}{% endmacro %}{{ r(0) }}",
        "tojson-indent-huge": "{{ messages|tojson(indent=10**8) }}",
        "list-times": "{{ ([1] * 10**8)|length }}",
        "pow-huge": "{{ 10 ** 10 ** 8 }}",
        # plain template errors
        "raise-exception": "{{ raise_exception('this template refuses') }}",
        "syntax-error": "{% for %}",
        "unclosed": "{% if messages %}",
        "undefined-call": "{{ nothing() }}",
        "zero-division": "{{ 1 / 0 }}",
        "include": "{% include '/etc/passwd' %}",
        "import": "{% import 'os' as os %}",
        "extends": "{% extends 'base.html' %}",
        "empty": "",
        "null-bytes": "a\x00b{{ messages[0]['content'] }}",
        "lone-surrogate": "\ud800{{ bos_token }}",
        # non-string values where a template should be
        "int": 5,
        "null": None,
        "list-of-named": [{"name": "default", "template": "{{ 'x' * 10**9 }}"}],
        "list-junk": [1, "a", None],
        "dict": {"template": "x"},
    }


# fragments a random template is built from: statements, expressions and filters that reach the corners
_EXPR = [
    "messages[0]['content']",
    "messages|length",
    "messages[-1]",
    "messages[10**6]",
    "bos_token",
    "eos_token",
    "add_generation_prompt",
    "range(1000)|list",
    "'x' * 100000",
    "messages|tojson",
    "messages|map(attribute='role')|join(',')",
    "(messages|first).content|upper",
    "cycler(1, 2).next()",
    "namespace(a=1).a",
    "none.x",
    "messages.__len__",
    "{}.get('a')",
    "'%s' % messages",
    "[] | max",
    "tools",
    "lipsum(5)",
    "'\\u00e9\\u202e\\U0001f600'",
]
_FILTER = ["upper", "trim", "tojson", "length", "string", "list", "reverse", "unique", "int", "float", "safe", "e"]


def random_template(rng: random.Random, depth: int = 0) -> str:
    """A random template: text, expressions with filters, loops, conditions, set and macros, nested."""
    parts = []
    for _ in range(rng.randint(1, 4)):
        kind = rng.random()
        if kind < 0.35 or depth > 2:
            expr = rng.choice(_EXPR)
            for _ in range(rng.randint(0, 2)):
                expr += "|" + rng.choice(_FILTER)
            parts.append("{{ " + expr + " }}")
        elif kind < 0.55:
            n = rng.choice([0, 1, 3, 100, 10**4, 10**5, 10**6])
            parts.append(f"{{% for i in range({n}) %}}{random_template(rng, depth + 1)}{{% endfor %}}")
        elif kind < 0.7:
            parts.append(f"{{% if {rng.choice(_EXPR)} %}}{random_template(rng, depth + 1)}{{% endif %}}")
        elif kind < 0.8:
            parts.append(f"{{% set v = {rng.choice(_EXPR)} %}}{{{{ v }}}}")
        elif kind < 0.9:
            parts.append("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
        else:
            parts.append(rng.choice(["<|user|>", "\n", "\x00", "{{", "{%", "%}", "}}", "{#", "\\"]))
    return "".join(parts)
