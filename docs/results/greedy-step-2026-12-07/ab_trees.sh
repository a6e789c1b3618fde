# Old tree (83477fd) and new tree (HEAD), process by process, alternated; each process the
# median of 8 runs of 24 one-sequence decode steps.
for i in $(seq 1 $1); do
  if [ $((i % 2)) -eq 1 ]; then order="old new"; else order="new old"; fi
  for t in $order; do
    if [ $t = old ]; then d=/tmp/w/old_tree; else d=/work/main; fi
    v=$(cd $d && PYTHONPATH=$d /work/main/.venv/bin/python /tmp/w/dec.py 8 2>/dev/null | tail -1)
    echo "$i $t $v"
  done
done
