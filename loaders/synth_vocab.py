"""Vocabularies for the synthetic atlases: Census-like labels so filters and batch keys read naturally.

Assay, sex, disease and tissue_general ontology ids are the real terms; cell-type, tissue and
development-stage ids are synthetic placeholders (CL:99xxxxx, UBERON:99xxxxx, HsapDv:99xxxxx).
"""
from __future__ import annotations

# (name, lineage, home tissue_general values; "*" = every tissue), most abundant first
CELL_TYPES = [
    ("CD4-positive, alpha-beta T cell", "lymphoid", "*"),
    ("classical monocyte", "myeloid", "*"),
    ("CD8-positive, alpha-beta T cell", "lymphoid", "*"),
    ("endothelial cell", "endothelial", "lung liver heart kidney brain"),
    ("fibroblast", "stromal", "lung heart kidney liver"),
    ("macrophage", "myeloid", "*"),
    ("natural killer cell", "lymphoid", "*"),
    ("B cell", "lymphoid", "blood lung liver"),
    ("type II pneumocyte", "epithelial", "lung"),
    ("hepatocyte", "epithelial", "liver"),
    ("cardiac muscle cell", "muscle", "heart"),
    ("kidney proximal tubule cell", "epithelial", "kidney"),
    ("oligodendrocyte", "neural", "brain"),
    ("neuron", "neural", "brain"),
    ("non-classical monocyte", "myeloid", "blood lung"),
    ("alveolar macrophage", "myeloid", "lung"),
    ("astrocyte", "neural", "brain"),
    ("smooth muscle cell", "stromal", "lung heart kidney"),
    ("ciliated cell", "epithelial", "lung"),
    ("type I pneumocyte", "epithelial", "lung"),
    ("pericyte", "stromal", "heart brain kidney"),
    ("plasma cell", "lymphoid", "blood lung liver"),
    ("conventional dendritic cell", "myeloid", "*"),
    ("microglial cell", "neural", "brain"),
    ("club cell", "epithelial", "lung"),
    ("basal cell", "epithelial", "lung"),
    ("mast cell", "myeloid", "lung heart"),
    ("kidney loop of Henle epithelial cell", "epithelial", "kidney"),
    ("cholangiocyte", "epithelial", "liver"),
    ("plasmacytoid dendritic cell", "myeloid", "blood lung"),
    ("erythrocyte", "myeloid", "blood"),
    ("platelet", "myeloid", "blood"),
]
# rare types: (name, lineage, preferred tissue); each lives in one tissue (the preferred one when present)
RARE_TYPES = [
    ("ionocyte", "epithelial", "lung"),
    ("hematopoietic stem cell", "progenitor", "blood"),
    ("pulmonary neuroendocrine cell", "epithelial", "lung"),
    ("innate lymphoid cell", "lymphoid", "blood"),
    ("tuft cell", "epithelial", "kidney"),
    ("megakaryocyte", "myeloid", "blood"),
]
TISSUES = {  # tissue_general -> (ontology id, specific tissues)
    "lung": ("UBERON:0002048", ["lung parenchyma", "upper lobe of left lung", "bronchus"]),
    "blood": ("UBERON:0000178", ["blood", "venous blood"]),
    "liver": ("UBERON:0002107", ["liver", "caudate lobe of liver"]),
    "heart": ("UBERON:0000948", ["heart left ventricle", "right cardiac atrium"]),
    "kidney": ("UBERON:0002113", ["kidney", "cortex of kidney"]),
    "brain": ("UBERON:0000955", ["cerebral cortex", "hippocampal formation"]),
}
# assay kinds: (assay, ontology id, relative weight among datasets, median library size over 2,000 genes, suspension)
ASSAYS = [
    ("10x 3' v3", "EFO:0009922", 0.45, 700.0, "cell"),
    ("10x 3' v2", "EFO:0009899", 0.2, 400.0, "cell"),
    ("10x 5' v1", "EFO:0011025", 0.15, 500.0, "cell"),
    ("Smart-seq2", "EFO:0008931", 0.08, 2000.0, "cell"),
    ("10x 3' v3", "EFO:0009922", 0.12, 300.0, "nucleus"),
]
SEXES = {"female": "PATO:0000383", "male": "PATO:0000384"}
DISEASES = {"normal": "PATO:0000461", "COVID-19": "MONDO:0100096", "lung adenocarcinoma": "MONDO:0005061"}
ETHNICITIES = {"European": "HANCESTRO:0005", "Asian": "HANCESTRO:0008", "African American": "HANCESTRO:0568",
               "unknown": "unknown"}
DEV_STAGES = [f"{d}-year-old stage" for d in (25, 34, 41, 52, 58, 63, 70, 77)]
