# ESM2 embeddings of every perturbed gene (zero vector for the control), from the configured ESM2.

rule build_tiny_esm2:
    output:
        directory(ESM2_TINY_DIR),
    log:
        "logs/esm2/build_tiny.log",
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
    conda:
        ENV
    script:
        "../scripts/download_source.py"


rule embed_genes:
    input:
        split="results/{dataset}/split.csv",
        sequences=lambda w: config["datasets"][w.dataset]["esm2"]["sequences"],
        model=esm2_model_input,
        release_note=lambda w: config["esm2"].get("uniprot_release_note") or [],
    output:
        "results/{dataset}/esm2.npz",
    params:
        model=lambda w: ESM2_TINY_DIR if config["esm2"]["model"] == "tiny" else config["esm2"]["model"],
        batch_size=config["esm2"].get("batch_size", 8),
        control=lambda w: config["datasets"][w.dataset]["control_label"],
        allow_missing=config["esm2"].get("allow_missing", False),
        release=config["esm2"].get("uniprot_release"),
        taxon_id=config["esm2"].get("taxon_id"),
    log:
        "logs/esm2/{dataset}.log",
    benchmark:
        "benchmarks/esm2/{dataset}.tsv"
    resources:
        gpu=lambda w: 0 if config["esm2"]["model"] == "tiny" else 1,
        mem_mb=data_mem_mb("embed_genes"),
        runtime=data_runtime("embed_genes"),
    conda:
        ENV
    script:
        "../scripts/embed_genes.py"
