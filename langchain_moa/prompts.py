"""Default prompt texts, written for this project.

They are plain strings (never prompt templates), so braces in model answers or user
text can never break formatting.
"""

DEFAULT_AGGREGATOR_PROMPT = (
    "Several assistants have each drafted an answer to the latest user message. Their drafts "
    "are listed below, numbered. Write the single best reply you can: check the drafts against "
    "each other, keep what is correct and useful, fix or drop what is wrong, and fill any gaps. "
    "Do not mention the drafts or that you were given them; answer the user directly, in the "
    "language and format the conversation calls for.\n\nDrafts:"
)
