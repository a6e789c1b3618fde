"""Ask a fleetlm endpoint a few questions with the OpenAI SDK; write what came back as JSON.

    python openai_client.py BASE_URL MODEL NUM_REQUESTS RESULT.json

Run on the test's laptop (the head's network), as a user of the cluster would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from openai import OpenAI

TIMEOUT_S = 120.0


def main(base_url: str, model: str, num_requests: str, result_path: str) -> None:
    client = OpenAI(base_url=base_url, api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    answers = []
    for i in range(int(num_requests)):
        reply = client.chat.completions.create(
            model=model, max_tokens=8, temperature=0,
            messages=[{"role": "user", "content": f"Count from {i} to {i + 3}."}])
        answers.append({"text": reply.choices[0].message.content,
                        "finish_reason": reply.choices[0].finish_reason,
                        "completion_tokens": reply.usage.completion_tokens})
    models = [m.id for m in client.models.list()]
    Path(result_path).write_text(json.dumps({"answers": answers, "models": models}))


if __name__ == "__main__":
    main(*sys.argv[1:5])
