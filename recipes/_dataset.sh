# Sourced by the recipes: $1 = coco|lvis → $ann (ground truth), $model (released OVSAM model),
# $images (val2017 folder). OVSAM_RECIPE_MODEL replaces the model (e.g. tiny for smoke tests).
case "${1:?coco or lvis}" in
  coco) ann=${COCO:?set COCO}/annotations/instances_val2017.json; model=${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-coco} ;;
  lvis) ann=${LVIS:?set LVIS}/lvis_v1_val.json; model=${OVSAM_RECIPE_MODEL:-ovsam-rn50x16-lvis} ;;
  *) echo "error: dataset must be coco or lvis, not '$1'" >&2; exit 2 ;;
esac
images=${COCO:?set COCO}/val2017
