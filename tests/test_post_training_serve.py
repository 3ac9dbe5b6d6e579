"""``hybridlm sft`` then ``hybridlm dpo`` then ``hybridlm serve``: the served model answers a chat as it was
taught to, through the chat template the checkpoint carries (a custom one here, so the default could not pass)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
import torch  # noqa: E402
from post_training_models import write_jsonl  # noqa: E402
from serve_helpers import reference  # noqa: E402

from hybridlm import HybridLM, ModelConfig  # noqa: E402
from hybridlm.chat_template import ChatTemplate  # noqa: E402
from hybridlm.cli import main  # noqa: E402
from hybridlm.serve import BackgroundServer, create_app  # noqa: E402
from hybridlm.serve.app import load_served_model  # noqa: E402

TEMPLATE = {"message": "## {role}: {content}\n", "generation_prompt": "## assistant:", "stop": ["\n## user"]}
ANSWERS = {"colour of the sky?": " blue", "two plus two?": " four", "capital of France?": " Paris"}
WRONG = {"colour of the sky?": " green", "two plus two?": " five", "capital of France?": " Rome"}


def chat(question: str, answer: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": question}]
    return messages if answer is None else [*messages, {"role": "assistant", "content": answer}]


def test_an_sft_then_dpo_checkpoint_is_served_with_its_chat_template(tmp_path: Path):
    torch.manual_seed(0)
    start = tmp_path / "start"
    HybridLM(ModelConfig.preset("llama-tiny")).save_pretrained(start)
    (start / "chat_template.json").write_text(json.dumps(TEMPLATE))
    sft = write_jsonl(tmp_path / "sft.jsonl", [{"messages": chat(q, a)} for q, a in ANSWERS.items()] * 4)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": chat(q), "chosen": [{"role": "assistant", "content": a}],
                                                   "rejected": [{"role": "assistant", "content": WRONG[q]}]}
                                                  for q, a in ANSWERS.items()] * 4)
    common = ["--batch-size", "6", "--seq-len", "64", "--warmup-steps", "2", "--no-progress", "--seed", "0"]
    main(["sft", str(start), "--data", str(sft), "--eval-data", str(sft), "--out", str(tmp_path / "sft"),
          "--steps", "120", "--lr", "1e-2", *common])
    main(["dpo", str(tmp_path / "sft" / "checkpoint"), "--data", str(pairs), "--eval-data", str(pairs),
          "--out", str(tmp_path / "dpo"), "--steps", "4", "--lr", "1e-3", "--lora", "r=4", "--merge", *common])
    served_dir = tmp_path / "dpo" / "merged"
    assert ChatTemplate.for_checkpoint(served_dir) == ChatTemplate(**TEMPLATE)

    served = load_served_model(f"assistant={served_dir}")
    model = HybridLM.from_pretrained(served_dir).eval()
    with BackgroundServer(create_app({"assistant": served})) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused-on-loopback", max_retries=0)
        for question, answer in ANSWERS.items():
            reply = client.chat.completions.create(model="assistant", messages=chat(question), max_tokens=16,
                                                   temperature=0, extra_body={"return_token_ids": True})
            prompt = ChatTemplate(**TEMPLATE).render(chat(question))
            assert prompt == f"## user: {question}\n## assistant:"
            # the server renders with the checkpoint's template: its tokens are what the model gives that text
            assert reply.choices[0].token_ids == reference(model, prompt, 16, temperature=0)[
                : len(reply.choices[0].token_ids)]
            # and the model learned, in that template, to answer, close its message ("\n") and stop (eos)
            assert reply.choices[0].message.content == answer + "\n"
            assert reply.choices[0].finish_reason == "stop"
