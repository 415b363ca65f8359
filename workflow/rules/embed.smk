# Gene embeddings of the perturbed genes (zero vector for the control), one file per configured embedding
# (esm2.embeddings: which ESM2 model, pooling, genes; or one-hot identity): results/{dataset}/embeddings/{embedding}.npz


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


rule fetch_ensembl_canonical:
    input:
        split="results/{dataset}/split.csv",
        processed="results/{dataset}/processed.h5ad",
    output:
        ENSEMBL_CANONICAL_FASTA,
    params:
        control=lambda w: config["datasets"][w.dataset]["control_label"],
        symbol_column=lambda w: config["datasets"][w.dataset]["esm2"].get("symbol_column", "gene_name"),
    log:
        "logs/esm2/{dataset}/ensembl_canonical.log",
    benchmark:
        "benchmarks/esm2/{dataset}/ensembl_canonical.tsv"
    conda:
        ENV
    script:
        "../scripts/fetch_ensembl_canonical.py"


rule embed_genes:
    input:
        unpack(embedding_inputs),
    output:
        "results/{dataset}/embeddings/{embedding}.npz",
    params:
        spec=lambda w: embedding_spec(w.embedding),
        model=embedding_model_path,
        control=lambda w: config["datasets"][w.dataset]["control_label"],
        shared=lambda w: {k: v for k, v in config["esm2"].items() if k in ESM2_SHARED_KEYS},
    log:
        "logs/esm2/{dataset}/{embedding}.log",
    benchmark:
        "benchmarks/esm2/{dataset}/{embedding}.tsv"
    resources:
        gpu=lambda w: 0 if embedding_on_cpu(w.embedding) else 1,
        mem_mb=embedding_resource("mem_mb"),
        runtime=embedding_resource("runtime"),
    conda:
        ENV
    script:
        "../scripts/embed_genes.py"
