#!/bin/bash
# Job %(ui_job_id)s of the seed-style test portal, run by the local scheduler.
echo "portal job %(ui_job_id)s"
cp "%(parameter_file)s" result.txt
echo "100%% done" >&2
