# ESM2 embeddings of every perturbed gene (zero vector for the control), from the configured ESM2.

rule build_tiny_esm2:
    output:
        directory(ESM2_TINY_DIR),
    log:
        "logs/esm2/build_tiny.log",
    benchmark:
        "benchmarks/esm2/build_tiny.tsv"
    conda:
        ENV
    script:
        "../scripts/build_tiny_esm2.py"


rule download_sequences:
    output:
        "resources/raw/esm2/{name}",
    params:
        source=lambda w: {"url": config["esm2"].get("sequence_sources", {}).get(w.name, "")},
    log:
        "logs/download/esm2/{name}.log",
    benchmark:
        "benchmarks/download/esm2/{name}.tsv"
    conda:
        ENV
    script:
        "../scripts/download_source.py"


rule embed_genes:
    input:
        split="results/{dataset}/split.csv",
        sequences=lookup(dpath="datasets/{dataset}/esm2/sequences", within=config),
        model=esm2_model_input,
        release_note=lookup(dpath="esm2/uniprot_release_note", within=config, default=[]),
    output:
        "results/{dataset}/esm2.npz",
    params:
        model=ESM2_MODEL,
        batch_size=lookup(dpath="esm2/batch_size", within=config),
        control=lookup(dpath="datasets/{dataset}/control_label", within=config),
        allow_missing=lookup(dpath="esm2/allow_missing", within=config),
        release=lookup(dpath="esm2/uniprot_release", within=config, default=None),
        taxon_id=lookup(dpath="esm2/taxon_id", within=config, default=None),
    log:
        "logs/esm2/{dataset}.log",
    benchmark:
        "benchmarks/esm2/{dataset}.tsv"
    resources:
        gpu=0 if ESM2_MODEL == ESM2_TINY_DIR else 1,
        mem_mb=data_mem_mb("embed_genes"),
        runtime=data_runtime("embed_genes"),
    conda:
        ENV
    script:
        "../scripts/embed_genes.py"
