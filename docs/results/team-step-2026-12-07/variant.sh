# $1: variant name; applies to the timed copy
cd /tmp/w/timed/csrc
case $1 in
v1) sed -i 's/    c->threads = is_team ? num_threads : region_threads;/    c->threads = region_threads;/' paged_attention.c ;;
v2) sed -i 's/    c->threads = is_team ? num_threads : region_threads;/    c->threads = region_threads;/; s/#define MIN_SPAN_TOKENS 64/#define MIN_SPAN_TOKENS 256/' paged_attention.c ;;
v3) sed -i 's/#define MIN_SPAN_TOKENS 64/#define MIN_SPAN_TOKENS 256/' paged_attention.c ;;
esac
grep -n "c->threads = \|define MIN_SPAN_TOKENS" paged_attention.c
