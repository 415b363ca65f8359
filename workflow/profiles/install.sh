#!/usr/bin/env bash
# Install this repository's Snakemake profiles for the current user, as symbolic links, so that
#   snakemake --profile slurm all      and      snakemake --profile local all
# work from the repository root exactly as typed (Snakemake looks for a profile named NAME in ./NAME, then in
# ${XDG_CONFIG_HOME:-$HOME/.config}/snakemake/NAME, then in the site config directory).
#
#   workflow/profiles/install.sh          install (or refresh) the links; running it again changes nothing
#   workflow/profiles/install.sh --force  also replace a profile of that name that is not a link to this repo
#
# The links point into this checkout: edits to workflow/profiles/* take effect at once; moving or deleting the
# checkout breaks them (run the script again from the new place).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
dest="${XDG_CONFIG_HOME:-$HOME/.config}/snakemake"
force="${1:-}"
mkdir -p "$dest"

status=0
for name in slurm local; do
    src="$here/$name"
    link="$dest/$name"
    if [[ -L "$link" && "$(readlink "$link")" == "$src" ]]; then
        echo "profile '$name': $link -> $src (already installed)"
        continue
    fi
    if [[ -e "$link" || -L "$link" ]]; then
        if [[ "$force" != "--force" ]]; then
            echo "profile '$name': $link exists and is not a link to $src; left alone (use --force to replace it)" >&2
            status=1
            continue
        fi
        rm -rf "$link"
    fi
    ln -s "$src" "$link"
    echo "profile '$name': $link -> $src"
done
exit "$status"
