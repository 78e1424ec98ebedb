"""gist: offline GISTEmbed guidance.

Stage 1 runs the guide once and stores its verdicts (false-negative masks) for a fixed batch plan;
stage 2 trains the student with those masks, without the guide.
"""

__version__ = "0.1.0"

# Bumped whenever the layout of an artifact changes; stage 2 refuses other versions.
FORMAT_VERSION = 1


class GistError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
