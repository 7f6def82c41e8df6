from django.apps import AppConfig


class HpcJobControllerConfig(AppConfig):
    name = "djangoapp"
    verbose_name = "HPC job controller"
    default_auto_field = "django.db.models.BigAutoField"
