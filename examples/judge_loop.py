"""Best-of-N with an MoA-ensemble judge, on the embedded local model.

Generates N candidate answers, has a 3-judge ensemble (Self-MoA samples of the local model,
verdicts constrained by a llama.cpp grammar) rank them pairwise in both orders, and
regenerates once if the best win rate is below the threshold.

    python examples/judge_loop.py "Explain recursion to a child."
"""

from __future__ import annotations

import argparse

from langchain_moa import MoAJudge, build_judge_graph, local_chat_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Give one tip for learning a language.")
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--threshold", type=float, default=0.6)
    args = parser.parse_args()

    judges = [local_chat_model(temperature=0.3, seed=s, max_tokens=160) for s in (1, 2, 3)]
    judge = MoAJudge(judges=judges, mode="pairwise", swap=True, grammar=True)
    generator = local_chat_model(max_tokens=96)
    graph = build_judge_graph(judge, generator, n=args.n, threshold=args.threshold, max_attempts=2)
    state = graph.invoke({"prompt": args.prompt})
    for i, (candidate, score) in enumerate(zip(state["candidates"], state["scores"], strict=True)):
        shown = "unrated" if score is None else f"win rate {score:.2f}"
        print(f"candidate {i} ({shown}): {candidate[:160]!r}")
    print(f"rounds: {state['attempts']}")
    print(f"best: {state['best']}")


if __name__ == "__main__":
    main()
