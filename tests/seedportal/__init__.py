"""A small research portal written in the seed's shapes (django_hpc_job_controller),
to show that code written for the seed runs here.  ``cluster/``: its scheduler
classes and templates, as they would sit in the seed's client directory."""
