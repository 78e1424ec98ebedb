"""`python -m pipeline`: print the versions of gist and the packages it runs on (as `gist --version`)."""

from pipeline.artifacts import package_versions

for name, version in package_versions().items():
    print(f"{name} {version}")
