"""A minimal Django project using the app, for the demo (SQLite in var/demo/)."""

import os

BASE = os.environ.get("HPC_DEMO_DIR") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "var", "demo")

SECRET_KEY = "demo-only-not-secret"
DEBUG = True
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "urls"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "djangoapp",
    "portal",  # the demo's own pages (demo/portal/): an example portal
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": [
        "django.template.context_processors.request",
        "django.contrib.auth.context_processors.auth",
        "django.contrib.messages.context_processors.messages",
    ]},
}]
STATIC_URL = "static/"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "portal:jobs"
LOGOUT_REDIRECT_URL = "login"
DATABASES = {"default": {
    "ENGINE": "django.db.backends.sqlite3",
    "NAME": os.path.join(BASE, "db.sqlite3"),
    # Django and hpcd write the same file: take the write lock at BEGIN.
    "OPTIONS": {"transaction_mode": "IMMEDIATE", "timeout": 30},
}}

# The app's settings (djangoapp/conf.py lists them all with their defaults).
HPC_IPC_UNIX_SOCKET = os.path.join(BASE, "hpcd.sock")
HPC_WEBSOCKET_PORT = int(os.environ.get("HPC_DEMO_PORT", "0"))  # 0: any free port
HPC_AGENT_RESUME_GRACE_SECONDS = 1
