# sourced on the device: Ray bundle + project on PYTHONPATH
[ -d /tmp/site/ray ] || { mkdir -p /tmp/site && tar -C /tmp/site -xJf .devbundle/ray312.tar.xz; }
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
