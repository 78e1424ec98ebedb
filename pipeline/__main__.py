"""`python -m pipeline`: print the versions of gist and the packages it runs on (as `gist --version`)."""

from pipeline.artifacts import versions_text

print(versions_text())
