"""ChatMoA inside an LCEL chain: prompt | ChatMoA | StrOutputParser.

ChatMoA is an ordinary chat model, so it composes like one: the prompt fills in the
question, MoA answers (proposers in parallel, then the aggregator), the parser returns
the text. Runs on the embedded local model by default (no API key):

    python examples/chain.py
    python examples/chain.py --recipe together-moa-lite "Explain the CAP theorem."
"""

from __future__ import annotations

import argparse

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_moa import ChatMoA


def build_chain(moa: ChatMoA):
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You are a concise assistant. Answer in at most three sentences."),
            ("human", "{question}"),
        ]
    )
    return prompt | moa | StrOutputParser()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("question", nargs="?", default="Why is the sky blue?")
    parser.add_argument("--recipe", default="local", help="recipe name or config file")
    parser.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    args = parser.parse_args(argv)

    chain = build_chain(ChatMoA.from_recipe(args.recipe))
    if args.stream:
        for piece in chain.stream({"question": args.question}):
            print(piece, end="", flush=True)
        print()
    else:
        print(chain.invoke({"question": args.question}))


if __name__ == "__main__":
    main()
