"""Every AnnData key the pipeline reads or writes, in one place.

Code and tests refer to these names instead of string literals, so the two cannot drift.
Conventions follow scanpy/squidpy: ``obsm['spatial']`` holds (x, y) = (column, row) in
full-resolution image pixels; ``uns['spatial'][library_id]`` holds ``images`` and ``scalefactors``.
"""

# --- obs ---------------------------------------------------------------------------------
ARRAY_ROW = "array_row"          # integer array coordinates (Visium row / ST y)
ARRAY_COL = "array_col"          # integer array coordinates (Visium col / ST x)
TOTAL_COUNTS = "total_counts"    # UMIs per spot over all genes read (the library size; an .h5ad of a gene subset: its own)
TRUTH = "truth"                  # optional ground-truth label (NaN = not annotated)
DOMAIN = "domain"                # categorical spatial domain found by stage 3
DOMAIN_UNREFINED = "domain_unrefined"  # GMM label before spatial smoothing
DOMAIN_UNCERTAINTY = "domain_uncertainty"  # 1 - the GMM's posterior probability of domain_unrefined (mclust's)
SECTION = "section"              # joint domains (pipeline.joint): the section (its run folder's name) a spot is of
CELL_AREA = "cell_area_px"       # cells as spots (Space Ranger's Visium HD segmentation): outline area, full-res px^2


def domain_for_k(k: int) -> str:
    """obs key of the domains for ``k`` domains from ``cluster.sweep`` (stage 3): ``domain_k{k}``, categorical."""
    return f"domain_k{int(k)}"


DOMAIN_FOR_K_PATTERN = r"domain_k(\d+)"  # every domain_for_k key (a rerun drops the sweep's old columns)

# --- var ---------------------------------------------------------------------------------
HIGHLY_VARIABLE = "highly_variable"
MORANS_I = "morans_i"            # stage 2: each gene's Moran's I on its measured log1p(CP10k), 6-nearest-spot graph
ZINB_THETA = "zinb_theta"        # stage 3: each gene's NB inverse dispersion, refit after training (layers['denoised'])

# --- obsm --------------------------------------------------------------------------------
SPATIAL = "spatial"                  # (n_spots, 2) float, (x, y) full-resolution pixels
IMAGE_FEATURES = "image_features"    # (n_spots, d_img) raw stage-1 features
IMAGE_ENHANCED = "image_enhanced"    # (n_spots, d_pc) standardised image PCs after enhancement
EMBEDDING = "embedding"              # (n_spots, d_emb) M-STGCN fused embedding
UMAP = "X_umap"                      # (n_spots, 2) UMAP of obsm['embedding'] (scanpy's key: sc.pl.umap reads it)
EMBEDDING_SEEDS = "embedding_seeds"  # (n_spots, n_seeds * d_emb) each seed's embedding side by side (model.n_seeds > 1)

# --- obsp --------------------------------------------------------------------------------
SPATIAL_WEIGHTS = "spatial_weights"  # (n_spots, n_spots) sparse row-stochastic weight matrix

# --- layers ------------------------------------------------------------------------------
DENOISED = "denoised"                # denoised expression of every gene in var_names: E[log1p(CP10k)] under the decoder's ZINB
DENOISED_MEAN = "denoised_mean"      # log1p of the decoder's NB mean in CP10k (no sampling noise, before the zero-inflation)
DENOISED_POSTERIOR = "denoised_posterior"   # with model.posterior_layer: the decoder's ZINB updated by the counts of each spot and its nearest spots, log1p(CP10k)
LOGNORM = "lognorm"                  # log1p(CP10k) of the raw counts, same units as DENOISED
ENHANCED = "enhanced"                # log1p(CP10k) after position-aware enhancement (stage 2)
MEASURED = "measured"                # stage 4 evaluation: measured log1p(CP10k) at the scored spots

# --- uns ---------------------------------------------------------------------------------
MSTGCN = "mstgcn"                    # stage 3: graphs, mean attention, loss history, n_clusters
DOMAIN_MATCHING = "domain_matching"  # stage 3, cluster.reference: the reference domain each domain was named after
DOMAIN_MARKERS = "rank_genes_groups"  # stage 3: each domain's genes against the rest (scanpy's own key and layout)
PAGA = "paga"                        # stage 3, plot.umap: the domains' PAGA graph (scanpy's key and layout)
DOMAIN_SIZES = "domain_sizes"        # stage 3, plot.umap: spots per domain (scanpy's '<groups>_sizes'; sc.pl.paga)
SWEEP_STABILITY = "sweep_stability"  # stage 3, cluster.sweep: {K: {'stability', 'stability_sd', 'seed_agreement'}} (no labels)
SECTIONS = "sections"                # joint domains: {section: {'spot_spacing_px', 'run'}}, in obs['section']'s order
SUPERRES = "superres"                # stage 4: model, genes, factor, protocol, image, grid spacing
PREDICTION = "prediction"            # stage 5: model, genes, section, training sections
SCORE_GENES = "score_genes"          # stage 4 evaluation: the scored genes
SPATIAL_UNS = "spatial"              # scanpy's uns['spatial'][library_id]
IMAGE_KINDS = ("fullres", "hires", "lowres")   # uns['spatial'][lib]['images'] keys (and image.use values), best first
FULLRES_PLACEMENT = "fullres_placement"   # uns['spatial'][lib]['metadata']: 2x3 affine, full-res image px -> obsm['spatial'] px
SPOT_SPACING = "spot_spacing_px"     # centre-to-centre spot distance, full-resolution pixels
PIPELINE = "pipeline"                # pipeline.api: {stage: JSON of the settings its outputs were made with}
IMAGE_FEATURES_INFO = IMAGE_FEATURES  # pipeline.api stage 1: which image, spot diameter in its px, encoder
METRICS = "metrics"                  # pipeline.api stage 4: metrics.json values (uns, or uns['superres'])
SCORES = "scores"                    # pipeline.api stage 5: uns['prediction']['scores'] against measured expression


def library_id(adata) -> str | None:
    """The first library id under ``uns['spatial']``, or None when there is no image metadata."""
    libs = adata.uns.get(SPATIAL_UNS, {})
    return next(iter(libs), None) if libs else None


def scalefactors(adata) -> dict:
    """The Space Ranger scale factors of the slide (empty dict when unknown)."""
    lib = library_id(adata)
    return dict(adata.uns[SPATIAL_UNS][lib].get("scalefactors", {})) if lib else {}
